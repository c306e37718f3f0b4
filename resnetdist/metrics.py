"""Where metrics go: metrics.jsonl (always), TensorBoard, W&B. Rank 0 gets the real sinks;
every other rank gets NullLogger, so training code logs without asking which rank it is.

Records carry `iter` (the x-axis everywhere); errors are in percent.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class LogConfig:
    name: str = ""  # run name; "" = <model>-s<seed>, e.g. resnet20-s0
    log_every: int = 100  # iterations between train-loss records (TensorBoard / W&B, progress)
    tensorboard: bool = True
    wandb_mode: str = "auto"  # auto: online when logged in or WANDB_API_KEY is set, else offline
    wandb_project: str = ""  # "" = $WANDB_PROJECT or "resnetdist"
    wandb_entity: str = ""  # "" = $WANDB_ENTITY or your default entity
    wandb_group: str = ""  # "" = the model name, so seeds of one net group together
    wandb_tags: list[str] = field(default_factory=list)
    wandb_init_timeout_s: int = 60

    def validate(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"log.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if self.log_every < 1:
            raise ValueError(f"log.log_every must be >= 1, got {self.log_every}")


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    wandb_id: str | None = None

    def log(self, record: dict[str, Any], kind: str = "eval") -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


class JsonlSink:
    """One JSON object per evaluation, appended and flushed, so a crash loses at most the line
    being written. On resume, records past the resume point are dropped first."""

    def __init__(self, path: Path, resume_iter: int):
        self.path = path
        if path.exists():
            kept = [
                line for line in path.read_text().splitlines()
                if line.strip() and _parse_iter(line) is not None and _parse_iter(line) <= resume_iter
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def log(self, record: dict[str, Any], kind: str) -> None:
        if kind == "eval":
            self.file.write(json.dumps(_clean(record)) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _parse_iter(line: str) -> int | None:
    try:
        return int(json.loads(line)["iter"])
    except (ValueError, KeyError, TypeError):
        return None


class TensorBoardSink:
    def __init__(self, log_dir: Path, resume_iter: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the checkpoint that a restarted run will write again
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_iter + 1 if resume_iter else None)

    def log(self, record: dict[str, Any], kind: str) -> None:
        step = record["iter"]
        for key, value in _clean(record).items():
            if key != "iter" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{kind}/{key}" if kind == "train" else key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
        if mode == "offline":
            print("W&B: not logged in, logging offline; upload later with `wandb sync <run dir>/wandb/offline-run-*`",
                  file=sys.stderr)
    return mode


class WandbSink:
    def __init__(self, cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], name: str,
                 group: str, tags: list[str], run_id: str | None):
        import wandb

        self.wandb = wandb
        self.id = run_id or uuid.uuid4().hex[:12]
        mode = resolve_wandb_mode(cfg.wandb_mode)
        kwargs = dict(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "resnetdist",
            entity=cfg.wandb_entity or None, group=cfg.wandb_group or group,
            tags=sorted(set(tags) | set(cfg.wandb_tags)), name=name, id=self.id, resume="allow",
            config=run_config, dir=str(run_dir), reinit="finish_previous",
        )
        settings = wandb.Settings(init_timeout=cfg.wandb_init_timeout_s, silent=True, console="off")
        try:
            self.run = wandb.init(mode=mode, settings=settings, **kwargs)
        except Exception as e:
            if mode != "online":
                raise
            # an unreachable server must not stop (or hang) training
            print(f"W&B: online init failed ({type(e).__name__}: {e}); continuing offline", file=sys.stderr)
            self.run = wandb.init(mode="offline", settings=settings, **kwargs)
        self.run.define_metric("iter")
        self.run.define_metric("*", step_metric="iter")

    def log(self, record: dict[str, Any], kind: str) -> None:
        values = _clean(record)
        if kind == "train":
            values = {("iter" if k == "iter" else f"train/{k}"): v for k, v in values.items()}
        self.run.log(values)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(_clean(values))

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Fans records out to the sinks of rank 0."""

    def __init__(self, sinks: list, wandb_sink: WandbSink | None):
        self.sinks = sinks
        self.wandb = wandb_sink
        self.wandb_id = wandb_sink.id if wandb_sink else None

    def log(self, record: dict[str, Any], kind: str = "eval") -> None:
        for sink in self.sinks:
            sink.log(record, kind)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb:
            self.wandb.summary(values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_logger(cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], name: str, group: str,
                tags: list[str], resume_iter: int, wandb_id: str | None) -> MetricLogger:
    sinks: list = [JsonlSink(run_dir / "metrics.jsonl", resume_iter)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tb", resume_iter))
    wandb_sink = None
    if cfg.wandb_mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            print("W&B: wandb is not installed (pip install 'resnetdist[wandb]'); not logging to W&B",
                  file=sys.stderr)
        else:
            wandb_sink = WandbSink(cfg, run_dir, run_config, name, group, tags, wandb_id)
            sinks.append(wandb_sink)
    return MetricLogger(sinks, wandb_sink)
