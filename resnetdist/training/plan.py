"""What a configuration means on this machine, decided once: `resolve(cfg, world_size)` turns
every "auto" and every derived number into a `Plan`, and the configuration stays as it was
loaded. The worker, the trainer, the header and `--dry-run` read the plan; rank 0 writes it
beside config.toml (RunDir.resolved, resolved.toml) once the step is built, with the step that
really runs (a graph whose capture failed runs eagerly).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, RunConfig
from .step import choose_kind, default_precision


@dataclass(frozen=True)
class Plan:
    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    step: str  # graph | compile | eager: the step asked of step.build_step (what ran, once written)
    step_reason: str  # why that step: asked for by name, auto's choice, or why it could not be
    loader: str  # resident | ffcv
    world_size: int
    global_batch: int  # images per iteration over all ranks
    batch_per_rank: int
    lr_scale: float  # the linear scaling rule's factor: world_size with dist.batch_scaling = per_rank, else 1

    def ran(self, kind: str, capture_error: str | None) -> Plan:
        """The plan with the step that runs: a graph whose capture failed runs eagerly."""
        if kind == self.step:
            return self
        return replace(self, step=kind, step_reason=f"graph capture failed: {capture_error}")


def resolve(cfg: RunConfig, world_size: int) -> Plan:
    """The plan of `cfg` on this machine with `world_size` ranks; ConfigError naming the key when
    the batch cannot be split."""
    t = cfg.train
    device = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = t.precision if t.precision != "auto" else default_precision(device == "cuda")
    step, note = choose_kind(t.step, device == "cuda", precision)
    reason = note or (f"train.step = {t.step}" if t.step != "auto" else f"auto: {step} on {device} with {precision}")
    per_rank = cfg.dist.batch_scaling == "per_rank"
    if not per_rank and cfg.optim.batch_size % world_size:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} does not divide across {world_size} ranks; "
            f"choose a multiple of {world_size} or set dist.batch_scaling=per_rank")
    batch = cfg.optim.batch_size * world_size if per_rank else cfg.optim.batch_size
    return Plan(device, precision, step, reason, cfg.data.loader, world_size, batch, batch // world_size,
                float(world_size) if per_rank else 1.0)
