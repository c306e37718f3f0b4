"""torch.distributed under torchrun, in the nanoGPT manner: read RANK / LOCAL_RANK /
WORLD_SIZE, pick the device, init the process group (NCCL on CUDA, gloo on CPU). Without
torchrun the same code runs as one process with world size 1.

A rank that stops answering (hung, SIGSTOPped, dead) makes the others' next collective fail
after the process group's timeout (`dist.timeout_s`; gloo raises in the waiting rank). The
collectives run inside `stage("what")`, which turns that failure into one PeerLost naming the
stage and the timeout; the CLI exits with its code, so torchrun (`--max-restarts`) restarts
the job from the newest checkpoint. On NCCL the watchdog aborts the process after the same
timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING's default) before any exception reaches Python: the
stage is not named there, but the exit and the restart are the same.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import PeerLost


# what gloo (and torch's c10d) say when a peer is gone or silent; NCCL names itself
PEER_FAILURE_MARKERS = ("Timed out", "timed out", "timeout", "Connection closed", "Connection reset",
                        "pair closure", "Broken pipe", "NCCL", "gloo")

_timeout_s: int | None = None  # the process group's, for messages


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_pref: str, timeout_s: int) -> DistContext:
    global _timeout_s
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    device = resolve_device(device_pref, local_rank)
    if world_size > 1 and not dist.is_initialized():
        _timeout_s = timeout_s
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank, local_rank, world_size, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def distributed() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def is_peer_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in PEER_FAILURE_MARKERS)


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Collectives of one stage of the run; a failure of theirs becomes a PeerLost naming it.
    Cheap (a try block): it wraps whole chunks of steps, not each step."""
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized() or isinstance(e, PeerLost) or not is_peer_failure(e):
            raise
        raise PeerLost(
            f"rank {dist.get_rank()}: the {what} failed: another rank stopped answering within "
            f"dist.timeout_s={_timeout_s} s or died (hung, stopped or killed); under torchrun with "
            f"--max-restarts the job restarts from the newest checkpoint. "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def all_reduce_max(value: int) -> int:
    """The largest of the ranks' values (this one's alone when not distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics and counters) copied in place into every
    rank's model. Each rank's BN statistics drift apart between DDP's per-forward broadcasts;
    evaluating after this, every rank evaluates rank 0's model, the one model.pt saves. In
    place, so a captured graph still points at them (and DDP broadcasts from rank 0 at the next
    forward anyway, so training is unchanged)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value, in rank order ([obj] when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
