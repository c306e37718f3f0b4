"""Where the model is wrapped for training: DistributedDataParallel across ranks, then
torch.compile. The step trains the wrapped model; checkpoints save the plain one."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist


def _ddp_options() -> dict[str, bool]:
    """No buffer broadcast before each forward: DDP would otherwise broadcast rank 0's BN
    statistics before every forward (a collective inside every graph replay). Training never
    reads them (BN in train mode uses the batch's statistics), rank 0's own are the same either
    way, and evaluation and the checkpoint use rank 0's (dist.broadcast_buffers before
    evaluating; rank 0 saves), so the run's results are bitwise unchanged (tests/test_hang.py).
    PyTorch 2.13 renamed the option forward_sync_buffers (broadcast_buffers=False, deprecated
    there, also skips the buffers' broadcast at construction); 2.11 knows only the old name.
    gradient_as_bucket_view: gradients are views into DDP's all-reduce buckets, not copied out
    of them after the all-reduce (the same sums, bitwise; less memory)."""
    known = inspect.signature(DDP.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    return {no_sync: False, "gradient_as_bucket_view": True}


DDP_OPTIONS = _ddp_options()


def wrap_model(model: nn.Module, device: torch.device, ddp: bool, compile_mode: str, graph: bool) -> nn.Module:
    """DDP (when several ranks train) around the model, torch.compile (mode "none": not)
    around that. Under a whole-step CUDA graph, compile must not capture graphs of its own."""
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **DDP_OPTIONS)
    if compile_mode != "none":
        mode = None if compile_mode == "default" else "max-autotune"
        if mode and graph:
            mode = "max-autotune-no-cudagraphs"  # our own graph captures the whole step
        dist.HangWatch.count_compiling_as_progress()  # a cold compile takes minutes: no hang
        model = torch.compile(model, mode=mode)
    return model
