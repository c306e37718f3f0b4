"""Every rank checks that its node holds the data, and all ranks agree on the outcome.

On a cluster each node reads the data from its own disk (or a share that may not be mounted
there). A rank that stops alone on a missing folder would leave the others waiting in their
next collective until dist.timeout_s; so each rank runs the check, the outcomes are gathered,
and if any failed every rank raises DataError: the failing rank with one line naming its host
and the path (`host node1: data folder /data/cifar not found`), rank 0 with the first failure,
the others with an empty message (they exit 2 too, saying nothing: the line is elsewhere).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, TypeVar

from .. import dist
from .cifar import DataError

T = TypeVar("T")


def on_every_rank(check: Callable[[], T], folder: str | None = None, what: str = "data check") -> T:
    """check() on this rank; DataError on every rank when it failed on any (see the module)."""
    result, error = None, None
    try:
        result = check()
    except DataError as e:  # the commonest case, the configured folder not there at all, in brief
        missing = folder and not Path(folder).is_dir()
        error = f"host {socket.gethostname()}: {f'data folder {folder} not found' if missing else e}"
    if not dist.distributed():
        if error:
            raise DataError(error)
        return result
    with dist.stage(what):
        outcomes = dist.all_gather_object((socket.gethostname(), error))
    failures = [(rank, host, msg) for rank, (host, msg) in enumerate(outcomes) if msg]
    if not failures:
        return result
    rank = dist.rank()
    first_on_my_host = next((r for r, host, _ in failures if host == socket.gethostname()), None)
    if rank == 0:
        raise DataError(error or failures[0][2])
    raise DataError(error if rank == first_on_my_host else "")


def require_files(paths: list[Path]) -> None:
    """DataError naming the first of `paths` that this node lacks."""
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"beton file {path} not found (run `resnetdist prepare` on this node, "
                            f"or set data.beton_dir to a folder every node sees)")
