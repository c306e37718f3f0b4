"""Every "auto" of a run's configuration that depends on the machine, replaced by what runs
here, once (at preflight, before workers start), each by the module that owns it: the device
(torch sees CUDA or not), the precision and the step (step.py), the W&B mode (metrics.py).
config.py only describes and checks; config.toml in the run directory then records what ran.
"""

from __future__ import annotations

import os
import sys

import torch

from ..config import RunConfig
from .metrics import resolve_wandb_mode
from .step import default_precision, resolve_step


def resolve(cfg: RunConfig) -> RunConfig:
    """cfg with device, precision, step and W&B mode resolved for this machine (in place; a
    resolved config stays as it is). Settings that cannot apply here are named in a note."""
    if cfg.train.device == "auto":
        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = cfg.train.device == "cuda"
    if cfg.train.precision == "auto":
        cfg.train.precision = default_precision(on_cuda)
    notes = resolve_step(cfg.train, on_cuda)
    cfg.log.wandb_mode = resolve_wandb_mode(cfg.log.wandb_mode)
    for note in notes:
        if os.environ.get("RANK", "0") == "0":  # once per job, not once per rank
            print(f"note: {note}", file=sys.stderr, flush=True)
    cfg.validate()
    return cfg
