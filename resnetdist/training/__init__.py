"""The training core: what each worker process does (worker.py), the Trainer that owns a run
(trainer.py), the step (step.py), the loop's parts (loop.py), the lr schedule, the optimizer,
evaluation, metrics and preemption.

The public pieces, for suite/ and tools/ (they import nothing else of training/): build (a
rank's Trainer, as a run builds it) and take_steps (the hot loop), for bench and doctor; lr_at
(the paper's lr of an iteration); true_fp32 (full-precision matmuls for an evaluation); the step
over any model (build_step with its StepChoice from choose_kind, the default_precision, the
TensorLRSGD it steps), for bench --pack, which times a fused pack against one dense model outside
a run; and the W&B conventions of the per-run logger (wandb_mode_here, wandb_settings, env_tags,
quiet_wandb_telemetry, warn), so a suite's summary run is filed like its runs.
"""

from .evaluate import true_fp32
from .loop import take_steps
from .metrics import env_tags, quiet_wandb_telemetry, wandb_mode_here, wandb_settings, warn
from .optim import TensorLRSGD
from .schedule import lr_at
from .step import StepChoice, TrainStep, build_step, choose_kind, default_precision
from .trainer import build

__all__ = ["StepChoice", "TensorLRSGD", "TrainStep", "build", "build_step", "choose_kind", "default_precision",
           "env_tags", "lr_at", "quiet_wandb_telemetry", "take_steps", "true_fp32", "wandb_mode_here",
           "wandb_settings", "warn"]
