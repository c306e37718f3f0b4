"""`resnetdist doctor` (its CPU subset, as CI runs it) and launch/gpu-acceptance.sh in DRY_RUN mode,
plus the acceptance summary read from stage outputs written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, cli_in_process, run_torchrun


def statuses(report):
    return {c["name"]: c["status"] for c in report["checks"]}


@pytest.mark.timeout(300)
def test_doctor_cpu_json(tiny_data):
    result = cli_in_process(["doctor", "--device", "cpu", "--json", "--steps", "2", "--skip", "compile,speed",
                             "--data-dir", str(tiny_data)])
    report = json.loads(result.stdout)
    got = statuses(report)
    assert report["ok"] and report["world_size"] == 1 and report["device"] == "cpu"
    assert got["graph_vs_eager"] == "skip" and got["compile_vs_eager"] == "skip"
    assert got["evaluation_between_steps"] == "ok" and got["checkpoint_into_built_step"] == "ok"
    # the tiny data is found and well formed, but it is not verified CIFAR-10: info, not ok
    data = next(c["detail"] for c in report["checks"] if c["name"] == "data")
    assert got["data"] == "info" and "not verified as CIFAR-10" in data, data
    assert {"torch", "CUDA", "cuDNN", "NCCL", "GPUs", "bf16", "FFCV", "W&B"} <= set(got)
    skipped = {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "skip"}
    assert skipped["graph_vs_eager"] == "skipped: needs CUDA"


def test_doctor_exits_1_on_a_failure(monkeypatch):
    from resnetdist.tools import doctor

    monkeypatch.setattr(doctor, "DEVICE_CHECKS", {"broken": lambda *a: (_ for _ in ()).throw(ValueError("boom"))})
    result = cli_in_process(["doctor", "--device", "cpu", "--json"], check=False)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and statuses(report)["broken"] == "fail"
    assert [c["detail"] for c in report["checks"] if c["name"] == "broken"] == ["ValueError: boom"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_doctor_full_cpu_including_compile():
    result = cli_in_process(["doctor", "--device", "cpu", "--json", "--steps", "2"])
    got = statuses(json.loads(result.stdout))
    assert got["compile_vs_eager"] == "ok" and got["speed_sample"] == "info"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_doctor_two_ranks_on_gloo():
    proc = run_torchrun(2, ["--device", "cpu", "--json", "--steps", "2", "--skip", "compile,speed,evaluation"],
                        command="doctor", timeout=500)
    report = json.loads(proc.stdout[proc.stdout.index("{"):].replace("[default0]:", ""))
    got = statuses(report)
    assert report["world_size"] == 2
    assert got["all_reduce"] == "ok" and got["ddp_weights_identical"] == "ok"
    assert got["device_checks_on_every_rank"] == "ok" and got["all_reduce_bandwidth"] == "info"


# ----- launch/gpu-acceptance.sh ------------------------------------------------------------------


def test_acceptance_dry_run_prints_every_stage(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": "python3"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu-acceptance.sh"), str(tmp_path / "out"), "/data/c10",
                           "/wheels"], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    stages = [line.split()[1] for line in lines if line.startswith("stage ")]
    assert stages == ["doctor", "pytest-cuda", "bench-n3", "bench-n9", "beton", "bench-loader", "train-resnet20",
                      "eval-resnet20", "compile", "bench-pack"]  # compile: what is left before the deadline less the pack stage's 45 s
    limits = {line.split()[1]: int(line.split("(limit ")[1].split()[0]) for line in lines if "(limit " in line}
    total = int(lines[-1].split("sum to ")[1].split()[0])
    assert lines[-1].startswith("total: ") and total == sum(limits.values())
    # 9.5 minutes (570 s): the deadline, and inside it the limits (the pack stage's 45 s among
    # them) and the summary's 5 s (a 15-minute device lease: start-up + one run + a partial rerun)
    assert total + 5 <= 570 and limits["bench-pack"] == 45 and "overall deadline 570 s (ACCEPTANCE_DEADLINE_S)" in lines[-1]
    assert limits["train-resnet20"] >= 1.5 * 156  # 64k graphed iterations at 2.43 ms on an H100 (a plain script's figure: docs/gpu-acceptance.md)
    text = "\n".join(lines)
    assert "pip install --no-index --no-deps --target" in text and "/wheels/*.whl" in text
    assert "-m pytest -q -m cuda" in text
    n3, n9, doctor, compiled = (next(line for line in lines if line.startswith(f"stage {name} ")) for name in
                                ("bench-n3", "bench-n9", "doctor", "compile"))
    assert "--modes eager\\,graph " in n3 and "bench -n 9" in n9 and "--modes eager\\,graph " in n9
    assert "bench -n 3" in compiled and "--modes compile " in compiled and "a cut is reported, not failed" in compiled
    packs = next(line for line in lines if line.startswith("stage bench-pack "))
    assert "bench --pack 1\\,4\\,8 -n 3" in packs
    assert "--skip compile\\,speed" in doctor  # the compile stage times compile, the bench stages speed
    train = next(line for line in lines if line.startswith("stage train-resnet20"))
    assert "train --n 3 --data-dir /data/c10" in train and "--iters" not in train  # the paper's 64k, defaults
    assert "train.step=graph" in train  # asked for by name: a failed capture stops it, no silent eager run
    assert not (tmp_path / "out" / "summary.json").exists()


def test_acceptance_usage():
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu-acceptance.sh")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_acceptance_summary_reads_the_stage_outputs(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "resnet20").mkdir()
    (tmp_path / "stages.tsv").write_text("doctor\tok\t20\t0\nbench-n3\tok\t60\t0\nbench-loader\tskipped: no FFCV\t0\t0\n"
                                         "train-resnet20\tok\t120\t0\neval-resnet20\tfailed\t3\t2\n")
    (tmp_path / "logs" / "doctor.log").write_text('note: x\n{"ok": true, "checks": [{"name": "a", "status": "ok"}]}\n')
    (tmp_path / "resnet20" / "summary.json").write_text(json.dumps({"test_error": 12.3, "train_seconds": 95.0}))
    (tmp_path / "bench-n3.json").write_text(json.dumps({"results": [
        {"setting": "baseline", "mode": "eager", "precision": "fp32", "ms_per_iter": 10.0, "speedup_vs_baseline": 1.0,
         "projected_64k_s": 640.0},
        {"setting": "graph", "mode": "graph", "precision": "bf16", "ms_per_iter": 1.25, "speedup_vs_baseline": 8.0,
         "projected_64k_s": 80.0, "step": "graph"}]}))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "acceptance_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1  # the eval stage failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["ok"] and summary["total_seconds"] == 203
    assert summary["targets"]["resnet20_train_seconds"] == {"value": 95.0, "met": True}
    assert summary["targets"]["resnet20_best_speedup_vs_baseline"] == {"value": 8.0, "met": True}
    assert summary["targets"]["resnet56_best_projected_64k_s"]["met"] is None  # no bench-n9 output
    assert summary["metrics"]["doctor_failed"] == [] and "| eval-resnet20 | failed | 3 |" in proc.stdout


# ----- bounded checks ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_compile_check_is_ended_at_its_time_limit(tmp_path):
    import multiprocessing
    import time

    from resnetdist.data.cifar import write_synthetic
    from resnetdist.tools.doctor import compile_bounded

    import torch

    data = write_synthetic(tmp_path, 128, 200)
    t0 = time.monotonic()
    status, detail = compile_bounded(data, torch.device("cpu"), 1, timeout_s=2)
    assert status == "fail" and "did not finish within 2 s" in detail
    assert time.monotonic() - t0 < 60 and multiprocessing.active_children() == []


def test_a_bad_compile_timeout_is_one_line_and_exit_2():
    result = cli_in_process(["doctor", "--compile-timeout", "0"], check=False)
    assert result.exit_code == 2 and "--compile-timeout" in result.stderr


def test_the_speed_sample_fits_in_one_epoch():
    """Every warm-up and timed step in one epoch: no per-epoch order upload inside the timing."""
    from resnetdist.data.order import iters_per_epoch
    from resnetdist.tools.doctor import SPEED_ITERS, SPEED_WARMUP, speed_set_per_file

    assert iters_per_epoch(5 * speed_set_per_file(128), 128) > SPEED_WARMUP + SPEED_ITERS
