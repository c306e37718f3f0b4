"""Where the model is wrapped for training: DistributedDataParallel across ranks, then
torch.compile. The step trains the wrapped model; checkpoints save the plain one."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def wrap_model(model: nn.Module, device: torch.device, ddp: bool, compile_mode: str, graph: bool) -> nn.Module:
    """DDP (when several ranks train) around the model, torch.compile (mode "none": not)
    around that. Under a whole-step CUDA graph, compile must not capture graphs of its own."""
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode != "none":
        mode = None if compile_mode == "default" else "max-autotune"
        if mode and graph:
            mode = "max-autotune-no-cudagraphs"  # our own graph captures the whole step
        model = torch.compile(model, mode=mode)
    return model
