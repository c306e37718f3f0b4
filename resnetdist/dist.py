"""torch.distributed under torchrun, in the nanoGPT manner: read RANK / LOCAL_RANK /
WORLD_SIZE, pick the device, init the process group (NCCL on CUDA, gloo on CPU). Without
torchrun the same code runs as one process with world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BATCH_SCALING = ("split", "per_rank")


@dataclass
class DistConfig:
    # split: optim.batch_size is the global batch, divided across ranks (the paper's 128 on
    # any number of GPUs). per_rank: every rank takes optim.batch_size, the global batch grows
    # with the world size and the lr is scaled linearly with a warm-up (Goyal et al. 2017).
    batch_scaling: str = "split"
    scale_warmup_iters: int = 500
    sync_bn: bool = False
    timeout_s: int = 600  # process-group init and every collective

    def validate(self) -> None:
        if self.batch_scaling not in BATCH_SCALING:
            raise ValueError(f"dist.batch_scaling must be one of {BATCH_SCALING}, got {self.batch_scaling!r}")
        if self.timeout_s < 1 or self.scale_warmup_iters < 0:
            raise ValueError("dist.timeout_s must be >= 1 and dist.scale_warmup_iters >= 0")


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
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    device = resolve_device(device_pref, local_rank)
    if world_size > 1 and not dist.is_initialized():
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


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
