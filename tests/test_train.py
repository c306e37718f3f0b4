"""End-to-end training through the real CLI on a small learnable set, single process: in this
process where nothing depends on the process boundary, in a subprocess where a process is
killed."""

import json

import pytest
import torch

from resnetdist.rundir import RunDir
from resnetdist import checkpoint

from .conftest import RESUMABLE, TINY, cli_in_process, run_cli
from .helpers import assert_bitwise_equal, final_weights, read_jsonl


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("runs") / "learn"
    cli_in_process(["train", *TINY, "--iters", "150", "--data-dir", str(tiny_data), "--out", str(out),
                    "--set", "train.eval_every=50", "--set", "optim.lr=0.05"])
    return out


@pytest.mark.timeout(360)
def test_training_learns_and_writes_the_run_directory(trained_run):
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.toml", "metrics.jsonl", "summary.json", "model.pt", "model.safetensors", "ckpt_0000150.pt"} <= files
    records = read_jsonl(trained_run / "metrics.jsonl")
    assert [r["iter"] for r in records] == [50, 100, 150]
    for r in records:
        assert {"iter", "lr", "train_loss", "train_error", "test_error", "images_per_second"} <= r.keys()
    # milestones scaled from 32k/48k of 64k to 75/112 of 150
    assert records[0]["lr"] == pytest.approx(0.05) and records[-1]["lr"] == pytest.approx(0.0005)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["iterations"] == 150 and summary["train_seconds"] > 0 and summary["images_per_second"] > 0
    assert (summary["step"], summary["precision"], summary["loader"]) == ("eager", "fp32", "resident")
    assert summary["test_error"] == records[-1]["test_error"]
    assert summary["test_error"] < 40, "chance is 90%: the net did not learn"
    assert records[-1]["train_error"] < records[0]["train_error"]


def test_config_toml_is_the_configuration_and_resolved_toml_what_ran(trained_run):
    """The configuration is written as loaded ("auto" stays "auto"); what this machine made of
    it (the Plan) is its own record beside it."""
    from resnetdist.config import read_toml

    tree = read_toml(trained_run / "config.toml")
    assert (tree["train"]["device"], tree["train"]["precision"], tree["train"]["step"]) == ("cpu", "auto", "auto")
    assert tree["log"]["wandb_mode"] == "disabled" and tree["optim"]["warmup_iters"] == 0
    ran = read_toml(trained_run / "resolved.toml")["resolved"]
    assert (ran["device"], ran["precision"], ran["step"], ran["loader"], ran["world_size"]) == (
        "cpu", "fp32", "eager", "resident", 1)
    assert ran["batch_per_rank"] * ran["world_size"] == ran["global_batch"] and ran["step_reason"]


@pytest.mark.timeout(120)
def test_eval_command_agrees_with_the_run(trained_run, tiny_data):
    summary = json.loads((trained_run / "summary.json").read_text())
    for name in ("model.pt", "ckpt_0000150.pt"):
        proc = cli_in_process(["eval", str(trained_run / name), "--data-dir", str(tiny_data), "--device", "cpu", "--json"])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["test_error"] == pytest.approx(summary["test_error"], abs=1e-9)


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(300)
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, tiny_data, reference_run):
    """A run killed (SIGKILL) after iteration 25 and started again resumes from the checkpoint
    at 20 and ends with exactly the weights of an uninterrupted run."""
    args = ["train", *RESUMABLE, "--data-dir", str(tiny_data), "--set", "train.keep_checkpoints=2"]
    ref = reference_run(RESUMABLE)
    cut = tmp_path / "cut"
    killed = run_cli([*args, "--out", str(cut)], check=False, kill_at=(25, 0))
    assert killed.returncode == -9
    assert sorted(p.name for p in cut.glob("ckpt_*.pt")) == ["ckpt_0000010.pt", "ckpt_0000020.pt"]
    resumed = run_cli([*args, "--out", str(cut)])
    assert "resuming from ckpt_0000020.pt (iteration 20 of 30)" in resumed.stdout
    assert_bitwise_equal(final_weights(ref), final_weights(cut))
    assert read_jsonl(ref / "metrics.jsonl") == [
        {**r, "images_per_second": ref_r["images_per_second"], "train_seconds": ref_r["train_seconds"]}
        for r, ref_r in zip(read_jsonl(cut / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl"))
    ]


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(300)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_data, reference_run):
    args = ["train", *RESUMABLE, "--data-dir", str(tiny_data)]
    ref = reference_run(RESUMABLE)
    cut = tmp_path / "cut"
    run_cli([*args, "--out", str(cut)], check=False, kill_at=(25, 0))
    newest = cut / "ckpt_0000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    found = RunDir(cut).checkpoints.load_newest(warn=lambda *_: None)
    assert found[0].name == "ckpt_0000010.pt"
    resumed = run_cli([*args, "--out", str(cut)])
    assert "ckpt_0000020.pt is unreadable" in resumed.stdout
    assert "iteration 10" in resumed.stdout
    assert_bitwise_equal(final_weights(ref), final_weights(cut))


@pytest.mark.timeout(120)
def test_resume_with_a_different_experiment_is_refused(tmp_path, tiny_data):
    out = tmp_path / "run"
    args = ["train", *TINY, "--iters", "10", "--data-dir", str(tiny_data), "--out", str(out)]
    cli_in_process(args)
    before = (out / "config.toml").read_text()
    proc = cli_in_process([*args, "--set", "optim.lr=0.2"], check=False)
    assert proc.exit_code == 2 and "optim.lr: 0.1 -> 0.2" in proc.stderr
    assert (out / "config.toml").read_text() == before


@pytest.mark.timeout(120)
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = cli_in_process(["train", *TINY, "--iters", "40", "--data-dir", str(tiny_data), "--out", str(out),
                           "--set", "optim.lr=1e30", "--set", "train.checkpoint_every=10", "--set", "log.log_every=5"],
                          check=False)
    assert proc.exit_code == 3, proc.stderr
    assert "NaN or inf at iteration" in proc.stderr
    for ckpt in out.glob("ckpt_*.pt"):
        state = checkpoint.load(ckpt)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (out / "summary.json").exists()


@pytest.mark.timeout(120)
def test_validation_split_is_evaluated(tmp_path):
    from .conftest import write_dataset

    data = write_dataset(tmp_path / "data", 1200, 100)  # 6000 records: 1000 train + 5000 val
    out = tmp_path / "run"
    cli_in_process(["train", *TINY, "--iters", "10", "--data-dir", str(data), "--out", str(out),
                    "--set", "data.val_split=true", "--set", "train.eval_every=5"])
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in records] == [5, 10] and all(0 <= r["val_error"] <= 100 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_error"] == records[-1]["val_error"]
