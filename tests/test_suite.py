"""`reproduce --runs-per-gpu 2` on the CPU (as the "device"), and what a suite leaves in W&B,
read back from the offline run files: the suite's group, each run's model artifact (whose
file digests are those of model.pt, mean.npy and config.toml) and the summary run's table.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from .conftest import run_cli
from .helpers import read_jsonl

pytest.importorskip("wandb")
from .wandb_file import OfflineRun  # noqa: E402

SUITE = ["reproduce", "--depths", "8,14", "--no-plain", "--iters", "20", "--device", "cpu",
         "--set", "optim.batch_size=32", "--set", "data.eval_batch=100", "--set", "train.eval_every=10",
         "--set", "log.log_every=5", "--set", "log.tensorboard=false"]
NAMES = ("resnet14-s0", "resnet8-s0")


def wandb_md5(path: Path) -> str:
    """W&B's artifact digest: the base64 of the file's MD5."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def final_errors(out: Path) -> dict[str, float]:
    return {n: json.loads((out / n / "summary.json").read_text())["test_error"] for n in NAMES}


def artifacts_of(folder: Path) -> tuple[OfflineRun, list]:
    run = OfflineRun(folder)
    return run, [r.artifact for r in run.records if r.WhichOneof("record_type") == "artifact"]


@pytest.fixture(scope="module")
def suites(tmp_path_factory, tiny_data) -> tuple[Path, Path, str, str]:
    """The same two-run suite one run at a time (W&B off) and two at a time (W&B offline)."""
    root = tmp_path_factory.mktemp("suites")
    one = run_cli([*SUITE, "--data-dir", str(tiny_data), "--out", str(root / "one"),
                   "--set", "log.wandb_mode=disabled"], timeout=240)
    two = run_cli([*SUITE, "--runs-per-gpu", "2", "--data-dir", str(tiny_data), "--out", str(root / "paper"),
                   "--set", "log.wandb_mode=offline"], timeout=240, WANDB_MODE="offline")
    return root / "one", root / "paper", one.stdout, two.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_runs_per_device_give_the_same_report(suites):
    one, two, one_log, two_log = suites
    assert "1 at a time on this machine" in one_log and "2 at a time on this machine" in two_log
    # longest first, and with two slots both runs start before either finishes
    lines = [line for line in two_log.splitlines() if line.startswith(("[", "done", "FAIL"))]
    assert lines[0].startswith("[1/2] start resnet14-s0") and lines[1].startswith("[2/2] start resnet8-s0"), lines
    assert all(line.startswith("done") for line in lines[2:]) and len(lines) == 4, lines
    one_log_lines = [line for line in one_log.splitlines() if line.startswith(("[", "done"))]
    assert one_log_lines[1].startswith("done  resnet14-s0"), one_log_lines
    # same seeds, same errors: packing does not change a run
    assert final_errors(one) == final_errors(two)
    table = [line for line in (one / "report.md").read_text().splitlines() if line.startswith("| ResNet-")]
    assert table == [line for line in (two / "report.md").read_text().splitlines() if line.startswith("| ResNet-")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_suite_wandb_group_model_artifacts_and_summary_table(suites):
    _, out, _, log = suites
    for name in NAMES:
        (folder,) = (out / name / "wandb").glob("offline-run-*")
        run, artifacts = artifacts_of(folder)
        # one group for the suite (named after its folder), the role as the job type, the net in the config
        assert run.run.run_group == "paper" and run.run.job_type == "train"
        assert run.config["net"] == name.split("-")[0]
        (artifact,) = artifacts  # named by the run's id: model-<run name> collected unrelated suites' runs
        assert artifact.type == "model" and artifact.name == f"model-{run.run.run_id}"
        assert set(artifact.aliases) >= {"final", "latest"}
        files = {entry.path: entry.digest for entry in artifact.manifest.contents}
        assert files == {f: wandb_md5(out / name / f) for f in ("model.pt", "model.safetensors", "mean.npy", "config.toml", "resolved.toml")}
        assert json.loads(artifact.metadata)["test_error"] == final_errors(out)[name]

    (folder,) = (out / "suite" / "wandb").glob("offline-run-*")
    summary = OfflineRun(folder)
    assert summary.run.run_group == "paper" and summary.run.job_type == "report"
    assert summary.run.display_name == "paper-report"
    (row,) = [h for h in summary.history if "table6/path" in h]
    table = json.loads((folder / "files" / row["table6/path"]).read_text())
    got = {r[table["columns"].index("net")]: r[table["columns"].index("test_error_mean")] for r in table["data"]}
    assert got == {"ResNet-14": final_errors(out)["resnet14-s0"], "ResNet-8": final_errors(out)["resnet8-s0"]}
    assert (folder / "files" / row["figure6/path"]).read_bytes() == (out / "figure6.png").read_bytes()
    # ... and as a W&B line plot per panel: each net's test and training error, the runs' own values
    plot = json.loads((folder / "files" / row["figure6/ResNets_table/path"]).read_text())
    lines = {}
    for point in (dict(zip(plot["columns"], r)) for r in plot["data"]):
        lines.setdefault(point["lineKey"], []).append((point["step"], point["lineVal"]))
    assert set(lines) == {"ResNet-8 test", "ResNet-8 train", "ResNet-14 test", "ResNet-14 train"}, set(lines)
    for name in NAMES:
        records = read_jsonl(out / name / "metrics.jsonl")
        label = f"ResNet-{name.split('-')[0].removeprefix('resnet')}"
        assert lines[f"{label} test"] == [(r["iter"], r["test_error"]) for r in records]
    assert (folder / "files" / "report.md").read_text() == (out / "report.md").read_text()
    # Figure 7 and its numbers go to the same summary run
    assert (folder / "files" / row["figure7/path"]).read_bytes() == (out / "figure7.png").read_bytes()
    responses = json.loads((out / "layer_responses.json").read_text())
    assert (folder / "files" / "layer_responses.json").read_text() == (out / "layer_responses.json").read_text()
    logged = json.loads((folder / "files" / row["layer_responses/path"]).read_text())
    assert len(logged["data"]) == sum(len(r["stds"]) for r in responses["runs"]) == 1 + 6 * 2 + 1 + 6 * 1
    run_id = json.loads((out / "suite" / "suite.json").read_text())["wandb_report_id"]
    assert summary.run.run_id == run_id and f"({run_id}) in group paper" in log
    assert "W&B (offline): report recorded, not uploaded" in log and "report logged" not in log
