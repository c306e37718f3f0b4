"""Where metrics go: metrics.jsonl (always), TensorBoard, W&B. Rank 0's MetricLogger has the
sinks; every other rank's has none, so training code logs without asking which rank it is.

Records carry `iter` (the x-axis everywhere); errors are in percent.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from ..checkpoint import WriteError, atomic_write_text
from ..config import LogConfig, RunConfig
from ..errors import INTERRUPTED, Preempted
from ..rundir import RunDir


def wandb_mode_here(mode: str) -> str:
    """log.wandb_mode as this machine resolves it, where the logger lives (the configuration
    keeps "auto"): auto -> $WANDB_MODE when set, else online when logged in, else offline. An
    explicit log.wandb_mode (online/offline/disabled) wins over the environment."""
    if mode != "auto":
        return mode
    env = wandb_env_mode()
    if env in ("online", "offline", "disabled", "shared"):
        return "online" if env == "shared" else env
    return "online" if wandb_logged_in() else "offline"


def wandb_env_mode() -> str | None:  # None: WANDB_MODE / WANDB_DISABLED unset
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return {"dryrun": "offline", "run": "online"}.get(mode, mode) if mode else None


def wandb_logged_in() -> bool:
    """An API key in the environment, or `wandb login` having stored one in ~/.netrc for the
    server in use. Decided locally: nothing is sent over the network."""
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.is_file() and host in netrc.read_text(errors="ignore")
    except OSError:
        return False


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


class JsonlSink:
    """One JSON object per record of one kind (metrics.jsonl: each evaluation; progress.jsonl: each
    log point's training record, which `runs` and `reproduce` read), appended and flushed, so a
    crash loses at most the line being written. On resume, records past the resume point go first."""

    def __init__(self, path: Path, resume_iter: int, kind: str = "eval"):
        self.path, self.kind = path, kind
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if -1 < _parse_iter(line) <= resume_iter]
            atomic_write_text(path, "".join(line + "\n" for line in kept))  # WriteError on failure
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise WriteError(path, e) from e

    def log(self, record: dict[str, Any], kind: str) -> None:
        if kind == self.kind:
            try:
                self.file.write(json.dumps(_clean(record)) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: one clear WriteError, not a traceback
                raise WriteError(self.path, e) from e

    def summary(self, values: dict[str, Any]) -> None:  # summary.json is the run's own file
        pass

    def close(self, exit_code: int = 0, stopped: bool = False) -> None:
        try:
            self.file.close()
        except OSError:  # the failed write was already raised as WriteError from log()
            pass


def _parse_iter(line: str) -> int:
    """A record's `iter`; -1 for a line that is not a record (a torn last line)."""
    try:
        return int(json.loads(line)["iter"])
    except (ValueError, KeyError, TypeError):
        return -1


# ----- names: one per quantity, the same in TensorBoard and W&B (metrics.jsonl keeps its flat keys) ---

# A train record (every log.log_every iterations) carries the training loss, error and lr of the
# iterations since the previous log point; an evaluation record carries the error rates and the
# throughput. The evaluation record's own training window (since the previous evaluation) is
# the same quantity over a longer window: it stays in metrics.jsonl (the report's curves), and
# the charts show one training curve, train/loss.
CHART_NAMES = {
    "train": {"train_loss": "train/loss", "train_error": "train/error", "lr": "train/lr"},
    "eval": {"test_error": "eval/test_error", "val_error": "eval/val_error", "epoch": "eval/epoch",
             "images_per_second": "perf/images_per_second", "train_seconds": "perf/train_seconds"},
}


def chart_values(record: dict[str, Any], kind: str) -> dict[str, float]:
    names = CHART_NAMES[kind]
    return {names[k]: v for k, v in _clean(record).items() if k in names and isinstance(v, (int, float))}


class TensorBoardSink:
    """Scalars under the chart names, and the HParams dashboard's row of the run (`params`:
    run_params, with the final errors)."""

    def __init__(self, log_dir: Path, resume_iter: int, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.params = {k: v for k, v in params.items() if v is not None}

        # purge_step drops events past the checkpoint that a restarted run will write again
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_iter + 1 if resume_iter else None)

    def log(self, record: dict[str, Any], kind: str) -> None:
        for tag, value in chart_values(record, kind).items():
            self.writer.add_scalar(tag, value, record["iter"])
        self.writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        """The HParams row, written into this run's own event folder (run_name "."): without it
        add_hparams makes a sub-run per call, and the dashboard shows a row apart from the curves."""
        results = {f"hparams/{k}": values[k] for k in ("test_error", "val_error", "train_error")
                   if values.get(k) is not None}
        self.writer.add_hparams(self.params, results, run_name=".")
        self.writer.flush()

    def close(self, exit_code: int = 0, stopped: bool = False) -> None:
        self.writer.close()


def env_tags() -> list[str]:
    return [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]


def warn(message: str) -> None:  # a W&B problem: the run goes on
    print(f"W&B: {message}", file=sys.stderr, flush=True)


def quiet_wandb_telemetry() -> None:
    """Offline means nothing leaves the machine: turn off wandb's own error-report telemetry
    (the documented WANDB_ERROR_REPORTING), which otherwise tries the (unreachable) server at
    exit and can hold the process ~10-20 s. An explicit WANDB_ERROR_REPORTING is respected."""
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


def run_params(cfg: RunConfig) -> dict[str, Any]:
    """The keys a person filters and groups a project's runs by, beside the full config."""
    m, o = cfg.model, cfg.optim
    return {"net": m.name, "depth": m.depth, "plain": m.plain, "seed": cfg.train.seed, "iters": o.iters,
            "batch_size": o.batch_size, "lr": o.lr}


def wandb_settings(wandb, cfg: LogConfig):
    """The settings every W&B run of this package opens with (training and the suite's report):
    bounded init and finish, no console capture (the run's own log is train.log). `finish_timeout`
    is a setting of wandb releases from 2026 on; an older wandb (>= 0.19.10, pyproject's floor)
    has none, and its finish waits for the upload."""
    bounds = {"init_timeout": float(cfg.wandb_init_timeout_s)}
    if "finish_timeout" in wandb.Settings.model_fields:
        bounds["finish_timeout"] = float(cfg.wandb_finish_timeout_s)
    return wandb.Settings(silent=True, console="off", **bounds)


class WandbSink:
    """One W&B run per training run (docs/tracking.md). Its id is kept in the checkpoints, so a
    resumed run continues the same W&B run. When the bounded online init fails (server
    unreachable, bad key) the run carries on offline under the same id, with a warning; what a
    bounded finish did not upload stays on disk for `wandb sync`."""

    def __init__(self, run_cfg: RunConfig, mode: str, run_id: str | None):
        import wandb

        self.wandb, cfg, run_dir = wandb, run_cfg.log, run_cfg.run_dir
        # a checkpoint's id continues its run; else $WANDB_RUN_ID, which a W&B sweep agent sets for
        # the run it starts (so the run joins the sweep); else a new one
        self.id = run_id or os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
        self.mode = mode  # online or offline
        kwargs = dict(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "resnetdist",
            entity=cfg.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
            group=cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP") or run_cfg.model.name,
            tags=sorted(set(run_cfg.tags) | set(cfg.wandb_tags) | set(env_tags())),
            name=run_cfg.name, id=self.id, resume="allow", job_type=cfg.wandb_job_type or "train",
            # create_new: a pack's members are W&B runs open side by side in one process (each
            # closed by its own sink)
            config={**run_params(run_cfg), **run_cfg.to_dict()}, dir=str(run_dir), reinit="create_new",
        )
        settings = wandb_settings(wandb, cfg)
        if self.mode == "offline":
            quiet_wandb_telemetry()
        try:
            self.run = wandb.init(mode=self.mode, settings=settings, **kwargs)
        except Exception as e:
            if self.mode != "online":
                raise
            # An unreachable server or a rejected key must not stop training. The failed run
            # still holds its id in wandb's service process: shut that down first, then log
            # offline under the same id (so `wandb sync` later fills the same run).
            warn(f"online init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"continuing offline")
            try:
                wandb.teardown()
            except Exception:  # noqa: BLE001 - best effort; the offline init below reports real trouble
                pass
            quiet_wandb_telemetry()
            self.mode = "offline"
            self.run = wandb.init(mode="offline", settings=settings, **kwargs)
        if self.mode == "offline":
            why = "not logged in, " if wandb_env_mode() is None and not wandb_logged_in() else ""
            warn(f"{why}logging offline to {run_dir / 'wandb'}; upload later with "
                  f"`wandb sync {run_dir / 'wandb'}/offline-run-*`")
        self.broken = False
        self.run.define_metric("iter")
        # W&B's default summary of a metric is its last value: the summary's eval/test_error is the
        # final evaluation's, never the best (a minimum over evaluations selects on the test set)
        self.run.define_metric("*", step_metric="iter")

    def log(self, record: dict[str, Any], kind: str) -> None:
        self._call(self.run.log, {"iter": record["iter"], **chart_values(record, kind)})

    def summary(self, values: dict[str, Any]) -> None:
        self._call(self.run.summary.update, _clean(values))

    def log_model(self, run_dir: Path, mean: Any, metadata: dict[str, Any]) -> None:
        """The artifact `model-<run id>` (one per run, whatever its name, as Lightning's
        WandbLogger names them): the run's weights files, config.toml, resolved.toml and the mean
        image (mean.npy, float32 (3, 32, 32), [0, 1] units): enough to run the net."""
        def log() -> None:
            import numpy as np

            run = RunDir(run_dir)
            np.save(run.mean, np.asarray(mean, dtype=np.float32))
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata=_clean(metadata))
            for file in (run.model, run.safetensors, run.mean, run.config, run.resolved):
                if file.exists():
                    artifact.add_file(str(file), name=file.name)
            self.run.log_artifact(artifact, aliases=["final", "latest"])

        self._call(log)

    def close(self, exit_code: int = 0, stopped: bool = False) -> None:
        """Finish with the process's exit code; a run `stopped` at a checkpoint (a notice or
        Ctrl-C) is marked preempting first, so W&B shows it resumable and a sweep requeues it."""
        if stopped:
            self._call(self.run.mark_preempting)
        self._call(self.run.finish, exit_code)

    def _call(self, fn, *args) -> None:
        """A W&B failure mid-run (its service gone, say) costs the W&B record, not the run:
        warn once and stop sending; metrics.jsonl and TensorBoard carry on."""
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            self.broken = True
            warn(f"logging failed ({type(e).__name__}: {e}); no more W&B logging for this run")


class MetricLogger:
    """Fans records out to the sinks of rank 0; with none (MetricLogger()), logs nothing. Every
    sink has log(record, kind), summary(values) and close(exit_code, stopped)."""

    def __init__(self, sinks: list = (), wandb_id: str | None = None):
        self.sinks = list(sinks)
        self.wandb = next((sink for sink in self.sinks if isinstance(sink, WandbSink)), None)
        # with W&B off for this attempt, keep the id a checkpoint carried for the next one
        self.wandb_id = self.wandb.id if self.wandb else wandb_id

    def log(self, record: dict[str, Any], kind: str = "eval") -> None:
        for sink in self.sinks:
            sink.log(record, kind)

    def summary(self, values: dict[str, Any]) -> None:
        """summary.json's values: W&B's summary, and TensorBoard's HParams row with the final errors."""
        for sink in self.sinks:
            sink.summary(values)

    def log_model(self, run_dir: Path, mean: Any, metadata: dict[str, Any]) -> None:
        if self.wandb:
            self.wandb.log_model(run_dir, mean, metadata)

    def close_after(self, error: BaseException) -> None:
        """Close a run that did not finish: stopped as asked (Preempted: a notice or a first Ctrl-C,
        exit 6 or 130; a second Ctrl-C, 130) is not a failure; anything else is (exit 1)."""
        if isinstance(error, Preempted):
            self.close(error.exit_code, stopped=True)
        elif isinstance(error, KeyboardInterrupt):
            self.close(INTERRUPTED, stopped=True)
        else:
            self.close(1)

    def close(self, exit_code: int = 0, stopped: bool = False) -> None:
        for sink in self.sinks:
            sink.close(exit_code, stopped)


def open_logger(cfg: RunConfig, resume_iter: int, wandb_id: str | None) -> MetricLogger:
    """Rank 0's logger of a run; W&B among its sinks unless log.wandb_mode resolves to disabled."""
    run = RunDir(cfg.run_dir)
    sinks: list = [JsonlSink(run.metrics, resume_iter), JsonlSink(run.progress, resume_iter, "train")]
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run.tensorboard, resume_iter, run_params(cfg)))
    mode = wandb_mode_here(cfg.log.wandb_mode)
    if mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            warn("wandb is not installed (pip install 'resnetdist[wandb]'); not logging to W&B")
        else:
            sinks.append(WandbSink(cfg, mode, wandb_id))
    return MetricLogger(sinks, wandb_id)
