"""The training core: what each worker process does (worker.py), the Trainer that owns a run
(trainer.py), the step (step.py), the loop's parts (loop.py), the lr schedule, the optimizer,
evaluation, metrics and preemption.

The public pieces, for suite/ and tools/ (they import nothing else of training/):
lr_at (the paper's lr of an iteration), true_fp32 (full-precision matmuls for an evaluation),
and the W&B conventions of the per-run logger (resolve_wandb_mode, wandb_settings, env_tags,
quiet_wandb_telemetry, warn), so a suite's summary run is filed like its runs.
"""

from .evaluate import true_fp32
from .metrics import env_tags, quiet_wandb_telemetry, resolve_wandb_mode, wandb_settings, warn
from .schedule import lr_at

__all__ = ["env_tags", "lr_at", "quiet_wandb_telemetry", "resolve_wandb_mode", "true_fp32", "wandb_settings", "warn"]
