"""The launcher of `resnetdist train --nproc-per-node N`: torchrun's own entry point run in this
process, and the passing on of a second Ctrl-C to its workers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer

from .errors import INTERRUPTED, PREEMPTED

# what torchrun passes on to its workers: its defaults and Slurm's SIGUSR1 warning, which
# otherwise kills torchrun itself (the default action) and orphans the workers
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# a stop (Ctrl-C, SIGTERM) lets the workers reach their next log point and write a checkpoint
# before torchrun's SIGKILL: its default grace of 30 s is less than a log interval of a slow run
SHUTDOWN_GRACE_S = "300"


def torch_at_least(major: int, minor: int) -> bool:
    """torch's version is major.minor or newer ("2.11.0+cu130", "2.13.0a0")."""
    import torch

    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return True  # an unreadable version: a source build, assumed current


def shutdown_grace_env() -> dict[str, str]:
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT, where torchrun reads it: torch 2.12 and newer. Torch 2.11's
    torchrun has no such setting and always waits 30 s between SIGTERM and SIGKILL (a stop then
    checkpoints only if its log point comes within those 30 s; docs/faults.md)."""
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": SHUTDOWN_GRACE_S} if torch_at_least(2, 12) else {}


def torchrun(nproc: int, max_restarts: int, argv: list[str]) -> None:
    """Run torchrun's own entry point (torch.distributed.run), so that this and
    `torchrun --nproc_per_node=N -m resnetdist train ...` are the same run."""
    from torch.distributed.run import main as torchrun_main

    # torchrun restarts with gloo hang unless each attempt gets its own store (pytorch#135712)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # TORCH_NCCL_ASYNC_ERROR_HANDLING is decided in the worker, for every launcher (dist.py)
    for key, value in shutdown_grace_env().items():
        os.environ.setdefault(key, value)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        # "--" keeps torchrun's parser off our flags (it would take --n for an abbreviation of its
        # own); SIGUSR1 (Slurm's warning) added to the signals torchrun passes on to the workers
        torchrun_main(["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                       f"--signals-to-handle={TORCHRUN_SIGNALS}", "-m", "resnetdist", "--", "train", *argv])
    except SignalException as e:
        # The workers run in sessions of their own, so a terminal's Ctrl-C reaches torchrun alone,
        # which passes it on once. A second one interrupts torchrun's wait for them: pass it on
        # too, so that they stop at once rather than at their checkpoint (preempt.Notice). The
        # workers have said how they stopped; the launcher exits with the code of that stop
        stop_workers(e.sigval)
        if e.sigval not in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            raise
        raise typer.Exit(INTERRUPTED if e.sigval == signal.SIGINT else PREEMPTED) from None


def stop_workers(sig: int, grace_s: float = 30.0) -> None:
    """Send `sig` to this process's children still running (torchrun's workers), then wait for
    them; each has already had the signal once, so a second SIGINT ends it at once."""
    try:
        children = [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    for pid in children:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it has exited
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def strip_launch_args(argv: list[str]) -> list[str]:
    """The train command's arguments for each worker: the launcher's own options left out."""
    out, args = [], iter(argv)
    for arg in args:
        if arg in ("--nproc-per-node", "--max-restarts"):
            next(args, None)  # its value
        elif not arg.startswith(("--nproc-per-node=", "--max-restarts=")):
            out.append(arg)
    return out
