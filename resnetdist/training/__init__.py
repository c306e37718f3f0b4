"""The training core: what each worker process does (worker.py), the Trainer that owns a run
(trainer.py), the step (step.py), the loop's parts (loop.py), the lr schedule, the optimizer,
evaluation, metrics and preemption.

The public pieces, for suite/ and tools/ (they import nothing else of training/): build (a
rank's Trainer, as a run builds it: bench, bench --pack and doctor time and check what trains)
and take_steps (the hot loop); lr_at (the paper's lr of an iteration); true_fp32
(full-precision matmuls for an evaluation); and the W&B conventions of the per-run logger
(wandb_mode_here, wandb_settings, env_tags, quiet_wandb_telemetry, warn), so a suite's summary
run is filed like its runs.
"""

from .evaluate import true_fp32
from .loop import take_steps
from .metrics import env_tags, quiet_wandb_telemetry, wandb_mode_here, wandb_settings, warn
from .schedule import lr_at
from .trainer import build

__all__ = ["build", "env_tags", "lr_at", "quiet_wandb_telemetry", "take_steps", "true_fp32", "wandb_mode_here",
           "wandb_settings", "warn"]
