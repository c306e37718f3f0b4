"""What a configuration means on this machine, decided once: `resolve(cfg, world_size)` turns
every "auto" and every derived number into a `Plan`, and the configuration stays as it was
loaded. The worker, the trainer, the header and `--dry-run` read the plan; rank 0 writes it
beside config.toml (RunDir.resolved, resolved.toml) once the step is built, with the step that
really runs (auto's graph whose capture failed runs eagerly, saying so).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, RunConfig
from ..data.order import rank_batch
from .step import StepChoice, choose_kind


@dataclass(frozen=True)
class Plan:
    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    step: str  # graph | compile | eager: step.choose_kind's choice (what ran, once written)
    step_reason: str  # why that step: asked for by name, auto's choice, or auto's fall-back and why
    step_asked: str  # train.step as given: auto may fall back to eager, a step named runs or stops
    loader: str  # resident | ffcv
    world_size: int
    global_batch: int  # images per iteration over all ranks
    batch_per_rank: int
    lr_scale: float  # the linear scaling rule's factor: world_size with dist.batch_scaling = per_rank, else 1

    @property
    def choice(self) -> StepChoice:  # as step.build_step takes it
        return StepChoice(self.step, self.step_reason, self.step_asked)

    def ran(self, choice: StepChoice) -> Plan:
        """The plan with the step that runs (auto's graph whose capture failed: eager, and why)."""
        return replace(self, step=choice.kind, step_reason=choice.reason, step_asked=choice.asked)


def resolve(cfg: RunConfig, world_size: int) -> Plan:
    """The plan of `cfg` on this machine with `world_size` ranks; ConfigError naming the key when
    the batch cannot be split or the step asked for by name cannot run here (graph without
    CUDA: refused before any worker starts)."""
    t = cfg.train
    device = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # auto: bf16 on a GPU that supports it, else fp32
    precision = t.precision if t.precision != "auto" else (
        "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    choice = choose_kind(t.step, device == "cuda", precision)
    per_rank = cfg.dist.batch_scaling == "per_rank"
    if not per_rank and cfg.optim.batch_size % world_size:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} does not divide across {world_size} ranks; "
            f"choose a multiple of {world_size} or set dist.batch_scaling=per_rank")
    batch = cfg.optim.batch_size * world_size if per_rank else cfg.optim.batch_size
    return Plan(device, precision, choice.kind, choice.reason, choice.asked, cfg.data.loader, world_size, batch,
                rank_batch(batch, world_size), float(world_size) if per_rank else 1.0)
