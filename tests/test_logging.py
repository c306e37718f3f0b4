"""What a run logs, read back the way its readers read it: the W&B offline run's own
transaction log (.wandb), TensorBoard's event reader, metrics.jsonl and summary.json.

Real wandb, offline, no mocks: the .wandb file is read by tests/wandb_file.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from resnetdist import checkpoint

from .conftest import REPO, TINY, cli_env, run_cli
from .helpers import read_jsonl

pytest.importorskip("wandb")
from .wandb_file import OfflineRun, offline_runs  # noqa: E402


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# Quick settings with W&B offline and TensorBoard on (later flags win over TINY's).
LOGGED = [*TINY, "--set", "log.tensorboard=true", "--set", "log.wandb_mode=offline"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("logging") / "run"
    run_cli(["train", *LOGGED, "--iters", "30", "--data-dir", str(tiny_data), "--out", str(out),
             "--set", "train.eval_every=15", "--set", "log.log_every=10"], timeout=240, WANDB_MODE="offline")
    return out


@pytest.mark.timeout(300)
def test_wandb_offline_run_holds_config_history_and_summary(logged_run):
    records = read_jsonl(logged_run / "metrics.jsonl")
    summary = json.loads((logged_run / "summary.json").read_text())
    assert [r["iter"] for r in records] == [15, 30]
    (run,) = offline_runs(logged_run)

    # as W&B's users navigate a project: the role as job type, named by net and seed, grouped by
    # net (a suite: by suite), tagged by depth, plain/residual and seed
    assert run.run.job_type == "train"
    assert run.run.display_name == summary["name"] == "resnet8-s0"
    assert run.run.run_group == "resnet8"
    assert {"resnet8", "resnet", "depth8", "seed0"} <= set(run.run.tags)
    assert run.run.project == "resnetdist"
    assert run.file.name == f"run-{run.run.run_id}.wandb"

    # the resolved config is the one in config.toml, with the keys runs are filtered by on top
    with open(logged_run / "config.toml", "rb") as f:
        toml = tomllib.load(f)
    for section, values in toml.items():
        assert run.config[section] == values, section
    assert run.config["optim"]["iters"] == 30 and run.config["optim"]["milestones"] == [15, 22]
    assert {k: run.config[k] for k in ("net", "depth", "plain", "seed")} == \
        {"net": "resnet8", "depth": 8, "plain": False, "seed": 0}

    # every chart's x-axis is the iteration; the summary keeps the last evaluation, never the best
    assert any(m.name == "iter" for m in run.metrics)
    assert any(m.glob_name == "*" and m.step_metric == "iter" for m in run.metrics)

    # one name per quantity: the evaluations under eval/ match metrics.jsonl exactly ...
    evals = [h for h in run.history if "eval/test_error" in h]
    assert [h["iter"] for h in evals] == [r["iter"] for r in records]
    for h, r in zip(evals, records):
        for key, name in (("epoch", "eval/epoch"), ("test_error", "eval/test_error"),
                          ("images_per_second", "perf/images_per_second"), ("train_seconds", "perf/train_seconds")):
            assert h[name] == pytest.approx(r[key], rel=1e-12), key
    # ... and the training loss, error and lr under train/, every log_every iterations and at each
    # evaluation, under no other name
    train = [h for h in run.history if "train/loss" in h]
    assert [h["iter"] for h in train] == [10, 15, 20, 30]
    assert all({"train/error", "train/lr"} <= h.keys() for h in train)
    assert all(h["train/lr"] > 0 for h in train)
    names = {k for h in run.history for k in h if not k.startswith("_")}
    assert names == {"iter", "train/loss", "train/error", "train/lr", "eval/test_error", "eval/epoch",
                     "perf/images_per_second", "perf/train_seconds"}, names

    # the final summary carries summary.json; its test error is the final evaluation's
    for key in ("name", "model", "depth", "plain", "seed", "iterations"):  # text and integers: exact
        assert run.summary[key] == summary[key], key
    for key in ("test_error", "train_error", "train_seconds", "images_per_second"):
        assert run.summary[key] == pytest.approx(summary[key], rel=1e-12), key
    assert summary["test_error"] == records[-1]["test_error"]
    assert run.summary["eval/test_error"] == records[-1]["test_error"]  # the last evaluation's, a plain value

    # the model artifact is named by the run's id (a run's name recurs across suites), final and latest
    (artifact,) = [r.artifact for r in run.records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and artifact.name == f"model-{run.run.run_id}"
    assert set(artifact.aliases) >= {"final", "latest"}
    assert "exit" in run.kinds and "preempting" not in run.kinds, "the run was not finished"
    (exit_record,) = [r.exit for r in run.records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


@pytest.mark.timeout(120)
def test_tensorboard_events_match_metrics_jsonl_and_hold_the_hparams(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    records = read_jsonl(logged_run / "metrics.jsonl")
    scalars = tb_scalars(logged_run)
    for key, tag in (("test_error", "eval/test_error"), ("images_per_second", "perf/images_per_second")):
        assert [s for s, _ in scalars[tag]] == [r["iter"] for r in records], key
        for (_, value), r in zip(scalars[tag], records):
            assert value == pytest.approx(r[key], rel=1e-6), key  # events hold float32
    for tag in ("train/loss", "train/error", "train/lr"):  # the W&B names
        assert [s for s, _ in scalars[tag]] == [10, 15, 20, 30], tag

    # the HParams dashboard's row: the run's hyperparameters and its final errors
    acc = EventAccumulator(str(logged_run / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.ListFields()[0][1] for k, v in start.hparams.items()}
    assert {"net": "resnet8", "depth": 8, "seed": 0, "iters": 30} .items() <= hparams.items(), hparams
    summary = json.loads((logged_run / "summary.json").read_text())
    (final,) = scalars["hparams/test_error"]
    assert final[1] == pytest.approx(summary["test_error"], rel=1e-6)


@pytest.mark.timeout(180)
def test_disabled_writes_no_wandb_folder(tmp_path, tiny_data):
    out = tmp_path / "run"
    # an explicit log.wandb_mode wins over $WANDB_MODE (test_wandb_mode_resolution: the rest)
    run_cli(["train", *TINY, "--iters", "4", "--data-dir", str(tiny_data), "--out", str(out),
             "--set", "train.eval_every=4", "--set", "log.wandb_mode=disabled"], WANDB_MODE="offline")
    assert (out / "summary.json").exists() and not (out / "wandb").exists()
    assert not list(out.rglob("*.wandb"))


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(300)
def test_resumed_run_continues_the_same_wandb_run(tmp_path, tiny_data):
    out = tmp_path / "run"
    args = ["train", *LOGGED, "--iters", "30", "--data-dir", str(tiny_data), "--out", str(out),
            "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10"]
    # SIGKILLed right after the step of iteration 20, before its evaluation and checkpoint
    first = run_cli(args, check=False, WANDB_MODE="offline", kill_at=(20, 0))
    assert first.returncode != 0 and not (out / "summary.json").exists()
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000010.pt"]
    second = run_cli(args, WANDB_MODE="offline")
    assert "resuming from" in second.stdout + second.stderr

    # one W&B run id, kept in the checkpoint the second attempt resumed from
    run_id = checkpoint.load(out / "ckpt_0000010.pt")["wandb_id"]
    assert run_id and checkpoint.load(out / "ckpt_0000030.pt")["wandb_id"] == run_id
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders), folders
    killed, resumed = OfflineRun(folders[0], need_run=False), OfflineRun(folders[1])
    assert resumed.run.run_id == run_id and resumed.run.resume
    # what the killed attempt had flushed (wandb writes its log every ~2 s) belongs to the same run
    if killed.runs:
        assert killed.run.run_id == run_id
    assert [h["iter"] for h in killed.history if "eval/test_error" in h] in ([], [10])
    assert [h["iter"] for h in resumed.history if "eval/test_error" in h] == [20, 30]
    pieces = [killed, resumed]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in records] == [10, 20, 30]
    jsonl = {r["iter"]: r["test_error"] for r in records}
    for h in (h for p in pieces for h in p.history if "eval/test_error" in h):
        assert h["eval/test_error"] == pytest.approx(jsonl[h["iter"]])
    summary = json.loads((out / "summary.json").read_text())
    assert pieces[1].summary["test_error"] == pytest.approx(summary["test_error"])
    # TensorBoard: the replayed steps replace what the killed attempt wrote past its checkpoint
    scalars = tb_scalars(out)
    assert [s for s, _ in scalars["eval/test_error"]] == [10, 20, 30]


class _Blackhole:
    """A TCP server that accepts connections and never answers: an unreachable W&B host."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


OPEN_LOGGER = """
import sys, time
from pathlib import Path
from resnetdist.config import LogConfig, ModelConfig, RunConfig
from resnetdist.training.metrics import open_logger
cfg = RunConfig(model=ModelConfig(n=1), log=LogConfig(wandb_mode="online", wandb_init_timeout_s=3, tensorboard=False))
cfg.train.out = sys.argv[1]
t = time.monotonic()
logger = open_logger(cfg, 0, None)
print("init_seconds", time.monotonic() - t, flush=True)
logger.log({"iter": 1, "test_error": 50.0})
logger.summary({"test_error": 50.0})
logger.close()
print("wandb_id", logger.wandb_id, flush=True)
"""


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(180)
def test_unreachable_wandb_server_falls_back_to_offline(tmp_path):
    hole = _Blackhole()
    try:
        env = cli_env(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{hole.port}")
        env.pop("WANDB_MODE")
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", OPEN_LOGGER, str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=150)
        wall = time.monotonic() - t
    finally:
        hole.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "online init failed" in proc.stderr and "continuing offline" in proc.stderr
    assert "wandb sync" in proc.stderr
    run_id = proc.stdout.split("wandb_id")[-1].strip()
    (piece,) = offline_runs(tmp_path)
    assert piece.run.run_id == run_id
    assert [h["eval/test_error"] for h in piece.history] == [50.0]
    assert wall < 120, f"took {wall:.0f} s"


@pytest.mark.timeout(30)
def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from resnetdist.training.metrics import wandb_mode_here

    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode_here("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode_here("auto") == "online"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode_here("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode_here("auto") == "offline"  # the environment wins over a login ...
    assert wandb_mode_here("online") == "online"  # ... and the config over the environment
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode_here("auto") == "disabled"
    assert wandb_mode_here("offline") == "offline"
