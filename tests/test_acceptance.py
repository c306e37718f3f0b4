"""launch/gpu-acceptance.sh's time keeping, on a CPU: a stand-in $PYTHON whose `train` stage
writes one metrics.jsonl record and then hangs, with a child that ignores SIGTERM, as a stuck
stage on the GPU machine would. SIGTERM to the script, or its overall deadline, must end that
stage's whole process group and still write summary.json, showing how far the stage got."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "launch" / "gpu-acceptance.sh"

# python -c ... (the script's module probes): "absent", except the probe of python's include
# folder (the real one, or $FAKE_INCLUDE); the summary: the real one; `-m resnetdist
# train --out DIR` (or, with FAKE_HANG=compile, the compile bench): a record in DIR/metrics.jsonl,
# then hang (with a child that ignores SIGTERM) and write the pids and process group to
# $FAKE_PIDS; every other stage: pass at once
FAKE = '''#!{python}
import json, os, runpy, signal, subprocess, sys, time
args = sys.argv[1:]
if args[0] == "-c":
    if "sysconfig" in args[1]:
        import sysconfig
        print(os.environ.get("FAKE_INCLUDE") or sysconfig.get_paths()["include"])
        sys.exit(0)
    sys.exit(1)
if args[0].endswith("acceptance_summary.py"):
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
compile_bench = args[:3] == ["-m", "resnetdist", "bench"] and "compile" in args
if (args[:3] == ["-m", "resnetdist", "train"] and os.environ.get("FAKE_HANG", "train") == "train"
        or compile_bench and os.environ.get("FAKE_HANG") == "compile"):
    out = args[args.index("--out") + 1]
    if not compile_bench:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({{"kind": "train", "iter": 700, "train_loss": 1.5}}) + "\\n")
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(os.environ["FAKE_PIDS"], "w") as f:
        json.dump({{"pids": [os.getpid(), stubborn.pid], "pgid": os.getpgid(0)}}, f)
    time.sleep(600)
'''


@pytest.fixture
def fake_python(tmp_path) -> Path:
    path = tmp_path / "python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's zombie awaits a reaper, harmlessly)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def members(pgid: int) -> list[int]:
    """Live processes in process group pgid, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def start(tmp_path, fake_python, **env) -> subprocess.Popen:
    full = {**os.environ, "PYTHON": str(fake_python), "FAKE_PIDS": str(tmp_path / "pids.json"),
            "ACCEPTANCE_GRACE_S": "2", **env}
    full.pop("DRY_RUN", None)
    # its own session, so that a failing test can still clean up everything it started
    return subprocess.Popen(["bash", str(SCRIPT), str(tmp_path / "out"), str(tmp_path / "data")], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def check_nothing_left(tmp_path, proc: subprocess.Popen) -> dict:
    stage = json.loads((tmp_path / "pids.json").read_text())
    try:
        assert members(stage["pgid"]) == [], "the stage's process group outlived the script"
        assert not any(alive(pid) for pid in stage["pids"])
        assert members(proc.pid) == []  # nor anything in the script's own group
    finally:
        for pid in stage["pids"]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    return json.loads((tmp_path / "out" / "summary.json").read_text())


def train_stage(summary: dict) -> dict:
    return next(s for s in summary["stages"] if s["stage"] == "train-resnet20")


@pytest.mark.timeout(120)
def test_sigterm_mid_stage_ends_its_whole_group_and_writes_the_summary(tmp_path, fake_python):
    proc = start(tmp_path, fake_python)
    try:
        wait_for(tmp_path / "pids.json", 60)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output
    summary = check_nothing_left(tmp_path, proc)
    train = train_stage(summary)
    assert train["status"] == "interrupted: SIGTERM" and not summary["ok"]
    assert train["progress"]["last_metrics_record"]["iter"] == 700
    assert [s["stage"] for s in summary["stages"]][:2] == ["doctor", "pytest-cuda"]  # what ran before it
    assert "eval-resnet20" not in [s["stage"] for s in summary["stages"]]
    assert "last record: iteration 700" in output


@pytest.mark.timeout(120)
def test_the_overall_deadline_cuts_the_running_stage_and_skips_the_rest(tmp_path, fake_python):
    t0 = time.monotonic()
    proc = start(tmp_path, fake_python, ACCEPTANCE_DEADLINE_S="12")
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, output
    assert elapsed < 12 + 2 + 5, "the script ran past its deadline (plus the grace period and slack)"
    summary = check_nothing_left(tmp_path, proc)
    train = train_stage(summary)
    assert train["status"].startswith("timeout: overall deadline") and train["limit_s"] < 240
    assert train["progress"]["last_metrics_record"]["iter"] == 700
    evaluation = next(s for s in summary["stages"] if s["stage"] == "eval-resnet20")
    assert evaluation["status"].startswith("skipped: overall deadline") and not summary["ok"]


@pytest.mark.timeout(120)
def test_a_compile_cut_at_its_limit_is_reported_and_does_not_fail_the_acceptance(tmp_path, fake_python):
    """The compile stage runs last, with what is left before the deadline; a cold compile that
    does not finish is cut there, reported as "cut at N s", and the acceptance still passes."""
    # 60 s: the compile stage leaves the pack stage's 45 s and the summary's 5 s of it free
    proc = start(tmp_path, fake_python, ACCEPTANCE_DEADLINE_S="60", FAKE_HANG="compile")
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = check_nothing_left(tmp_path, proc)
    assert proc.returncode == 0 and summary["ok"], output
    *others, last, pack = summary["stages"]
    assert pack["stage"] == "bench-pack" and pack["status"] == "ok", pack  # after compile, in its 45 s
    assert last["stage"] == "compile" and re.fullmatch(r"cut at \d+ s", last["status"]), last
    assert 3 <= last["limit_s"] <= 10  # what was left of the deadline less the pack stage's 45 s
    assert all(s["status"] == "ok" or s["status"].startswith("skipped: FFCV") for s in others), others
    assert f"compile: {last['status']} (reported, not a failure" in output


@pytest.mark.timeout(60)
def test_without_python_h_the_compile_stage_is_skipped_naming_why(tmp_path, fake_python):
    proc = start(tmp_path, fake_python, FAKE_HANG="none", FAKE_INCLUDE=str(tmp_path))
    output, _ = proc.communicate(timeout=50)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    *_, last, pack = summary["stages"]
    assert proc.returncode == 0 and summary["ok"], output
    assert pack["stage"] == "bench-pack" and last["stage"] == "compile" and last["status"] == (
        f"skipped: torch.compile needs a C compiler and Python.h to build its kernels: no Python.h ({tmp_path}; "
        f"the python3-dev package)"), last


def test_an_output_folder_holding_a_finished_run_is_refused_unless_asked_to_start_afresh(tmp_path):
    """A finished training in OUT_DIR would "resume", find itself finished and report its old
    figures in seconds: refused with one line, before anything runs (DRY_RUN too)."""
    out = tmp_path / "out"
    (out / "resnet20").mkdir(parents=True)
    (out / "resnet20" / "summary.json").write_text('{"test_error": 8.5}')
    env = {**os.environ, "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), str(out), str(tmp_path)], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr == (f"error: OUT_DIR {out} is not empty (it holds an earlier acceptance's results, which a new "
                           f"run would report as its own); pass a new or empty folder, or set ACCEPTANCE_FRESH=1 to "
                           f"delete what it holds and start afresh\n")
    assert (out / "resnet20" / "summary.json").exists()  # nothing touched
    fresh = subprocess.run(["bash", str(SCRIPT), str(out), str(tmp_path)], capture_output=True, text=True, timeout=30,
                           env={**env, "ACCEPTANCE_FRESH": "1"})
    assert fresh.returncode == 0 and f"ACCEPTANCE_FRESH=1: would delete what {out} holds" in fresh.stdout
    assert "train.step=graph" in fresh.stdout  # the acceptance asks for the graph by name


def test_a_bad_deadline_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), str(tmp_path)], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "ACCEPTANCE_DEADLINE_S": "9m"})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "ACCEPTANCE_DEADLINE_S" in proc.stderr


# a module finder that refuses what the GPU machine lacks (docs/gpu-acceptance.md: no tomli-w, ffcv, wandb)
# and what a stock PyTorch CUDA image need not have
BLOCKER = '''import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"wandb", "ffcv", "tomli_w", "psutil", "yaml", "onnx", "onnxruntime", "safetensors"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
'''


@pytest.mark.timeout(300)
def test_cuda_tests_collect_without_the_packages_a_stock_cuda_image_lacks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", "tests"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "tests/test_step.py::test_graph_evaluation_between_replays_and_resume" in proc.stdout
