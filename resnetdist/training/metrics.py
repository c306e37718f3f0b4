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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..checkpoint import WriteError, atomic_write_text
from ..config import LogConfig
from ..rundir import RunDir


# ----- the W&B mode: log.wandb_mode "auto" decided here, where the logger lives (open_logger asks
# once); the configuration keeps "auto" ----------------------------------------------------------


def resolve_wandb_mode(mode: str) -> str:
    """auto -> $WANDB_MODE when set, else online when logged in, else offline. An explicit
    log.wandb_mode (online/offline/disabled) wins over the environment."""
    if mode != "auto":
        return mode
    env = wandb_env_mode()
    if env in ("online", "offline", "disabled", "shared"):
        return "online" if env == "shared" else env
    return "online" if wandb_logged_in() else "offline"


def wandb_env_mode() -> str | None:
    """The mode asked for by WANDB_MODE / WANDB_DISABLED, normalised; None when unset."""
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


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    wandb_id: str | None = None

    def log(self, record: dict[str, Any], kind: str = "eval") -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_model(self, run_dir: Path, mean: Any, metadata: dict[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
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
            atomic_write_text(path, "".join(line + "\n" for line in kept))  # WriteError on failure
        with _write_errors(path):
            self.file = open(path, "a")

    def log(self, record: dict[str, Any], kind: str) -> None:
        if kind == "eval":
            with _write_errors(self.path):  # a full disk: one clear WriteError, not a traceback
                self.file.write(json.dumps(_clean(record)) + "\n")
                self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the failed write was already raised as WriteError from log()
            pass


@contextmanager
def _write_errors(path: Path):
    try:
        yield
    except OSError as e:
        raise WriteError(path, e) from e


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


def env_tags() -> list[str]:
    return [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]


def warn(message: str) -> None:
    """A W&B problem, said in one line on stderr (the run goes on)."""
    print(f"W&B: {message}", file=sys.stderr, flush=True)


def wandb_settings(wandb, **kwargs):
    """wandb.Settings, plus a short flush interval of the run's .wandb file where the installed
    wandb has it (default 15 s): a run killed mid-way then loses at most ~2 s of what it sent
    to W&B, and its resumed attempt re-logs everything from the checkpoint on."""
    try:
        return wandb.Settings(x_transaction_log_flush_interval=2.0, **kwargs)
    except Exception:  # noqa: BLE001 - an older or newer wandb without that setting
        return wandb.Settings(**kwargs)


def quiet_wandb_telemetry() -> None:
    """Offline means nothing leaves the machine: turn off wandb's own error-report telemetry,
    which otherwise tries the (unreachable) server at exit and can hold the process ~10-20 s.
    An explicit WANDB_ERROR_REPORTING is respected."""
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    if os.environ["WANDB_ERROR_REPORTING"].lower() in ("false", "0", "no"):
        try:  # wandb >= 0.2x keeps it behind a private switch; nothing to do where it is absent
            from wandb.analytics.opentelemetry import opentelemetry_proxy

            opentelemetry_proxy.disable()
        except Exception:  # noqa: BLE001
            pass


class WandbSink:
    """One W&B run per training run, its id kept in the checkpoints so that a resumed run
    (same process or a later one) continues the same W&B run. Every chart's x-axis is `iter`.

    Names: run = <model>-s<seed> (log.name), group = <model> (seeds of one net together),
    tags = model, plain|resnet, depth<d>, seed<s> plus log.wandb_tags and $WANDB_TAGS.
    project / entity / group come from the config, else $WANDB_PROJECT / $WANDB_ENTITY /
    $WANDB_RUN_GROUP, else the defaults above.

    Online init is bounded by log.wandb_init_timeout_s; when it fails (server unreachable,
    bad key) the run carries on offline under the same id, with a warning. finish() is
    bounded by log.wandb_finish_timeout_s; what did not upload stays on disk for `wandb sync`.
    """

    def __init__(self, cfg: LogConfig, mode: str, run_dir: Path, run_config: dict[str, Any], name: str,
                 group: str, tags: list[str], run_id: str | None):
        import wandb

        self.wandb = wandb
        self.id = run_id or uuid.uuid4().hex[:12]
        self.mode = mode  # online or offline (resolve_wandb_mode)
        kwargs = dict(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "resnetdist",
            entity=cfg.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
            group=cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP") or group,
            tags=sorted(set(tags) | set(cfg.wandb_tags) | set(env_tags())),
            name=name, id=self.id, resume="allow", job_type=cfg.wandb_job_type or group,
            config=run_config, dir=str(run_dir), reinit="finish_previous",
        )
        settings = wandb_settings(wandb, init_timeout=float(cfg.wandb_init_timeout_s),
                                   finish_timeout=float(cfg.wandb_finish_timeout_s), silent=True, console="off")
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
        self.run.define_metric("*", step_metric="iter")

    def log(self, record: dict[str, Any], kind: str) -> None:
        values = _clean(record)
        if kind == "train":
            values = {("iter" if k == "iter" else f"train/{k}"): v for k, v in values.items()}
        self._call(self.run.log, values)

    def summary(self, values: dict[str, Any]) -> None:
        self._call(self.run.summary.update, _clean(values))

    def log_model(self, run_dir: Path, mean: Any, metadata: dict[str, Any]) -> None:
        """The final weights as a W&B model artifact `model-<run name>`: model.pt, the mean image
        the inputs are normalised with (mean.npy, float32 (3, 32, 32), [0, 1] units) and the
        run's config.toml and resolved.toml, so the artifact alone is enough to run the net."""
        self._call(self._log_model, run_dir, mean, metadata)

    def _log_model(self, run_dir: Path, mean: Any, metadata: dict[str, Any]) -> None:
        import numpy as np

        np.save(run_dir / "mean.npy", np.asarray(mean, dtype=np.float32))
        artifact = self.wandb.Artifact(f"model-{self.run.name}", type="model", metadata=_clean(metadata))
        run = RunDir(run_dir)
        for file in (run.model, run_dir / "mean.npy", run.config, run.resolved):
            if file.exists():
                artifact.add_file(str(file), name=file.name)
        self.run.log_artifact(artifact, aliases=["latest", f"iter{metadata.get('iterations', 0)}"])

    def close(self, exit_code: int = 0) -> None:
        # a non-zero exit code marks the W&B run as failed rather than finished
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
    """Fans records out to the sinks of rank 0."""

    def __init__(self, sinks: list, wandb_sink: WandbSink | None, wandb_id: str | None = None):
        self.sinks = sinks
        self.wandb = wandb_sink
        # with W&B off for this attempt, keep the id a checkpoint carried for the next one
        self.wandb_id = wandb_sink.id if wandb_sink else wandb_id

    def log(self, record: dict[str, Any], kind: str = "eval") -> None:
        for sink in self.sinks:
            sink.log(record, kind)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb:
            self.wandb.summary(values)

    def log_model(self, run_dir: Path, mean: Any, metadata: dict[str, Any]) -> None:
        if self.wandb:
            self.wandb.log_model(run_dir, mean, metadata)

    def close(self, exit_code: int = 0) -> None:
        for sink in self.sinks:
            if sink is self.wandb:
                sink.close(exit_code)
            else:
                sink.close()


def open_logger(cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], name: str, group: str,
                tags: list[str], resume_iter: int, wandb_id: str | None) -> MetricLogger:
    """The sinks of rank 0; W&B's among them unless log.wandb_mode resolves to disabled."""
    sinks: list = [JsonlSink(RunDir(run_dir).metrics, resume_iter)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tb", resume_iter))
    wandb_sink = None
    mode = resolve_wandb_mode(cfg.wandb_mode)
    if mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            warn("wandb is not installed (pip install 'resnetdist[wandb]'); not logging to W&B")
        else:
            wandb_sink = WandbSink(cfg, mode, run_dir, run_config, name, group, tags, wandb_id)
            sinks.append(wandb_sink)
    return MetricLogger(sinks, wandb_sink, wandb_id)
