"""The paper's schedule, counted in iterations: lr 0.1, divided by 10 at 32k and 48k, stop at
64k; ResNet-110 starts at 0.01 (warm-up)."""

from __future__ import annotations

import torch

from ..config import OptimConfig


def lr_at(optim: OptimConfig, it: int, world_scale: float = 1.0, scale_warmup: int = 0) -> float:
    """Learning rate of iteration `it` (0-based). world_scale > 1 is the linear scaling rule
    for a global batch grown with the world size, reached by a linear ramp over scale_warmup."""
    if it < optim.warmup_iters:
        return optim.warmup_lr
    base = optim.lr
    if world_scale != 1.0:
        ramp = min(1.0, (it + 1) / scale_warmup) if scale_warmup else 1.0
        base = optim.lr * (1 + (world_scale - 1) * ramp)
    return base * optim.gamma ** sum(it >= m for m in optim.milestones)


def lr_table(optim: OptimConfig, world_scale: float, scale_warmup: int) -> torch.Tensor:
    """The lr of every iteration, float32 (iters,): the step reads it on the device."""
    return torch.tensor([lr_at(optim, i, world_scale, scale_warmup) for i in range(optim.iters)],
                        dtype=torch.float32)
