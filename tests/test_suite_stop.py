"""Stopping a suite and reading where it stands, as a person does it: Ctrl-C typed into the
real pseudo-terminal that `reproduce` runs in (the terminal signals its whole foreground group),
then the same command again; and `reproduce --status` / `resnetdist runs` while a run trains."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from .conftest import REPO, cli_env, cli_in_process, run_cli

SUITE = ["reproduce", "--depths", "8", "--no-plain", "--seeds", "2", "--iters", "120", "--device", "cpu",
         "--set", "optim.batch_size=32", "--set", "data.eval_batch=100", "--set", "train.eval_every=40",
         "--set", "log.log_every=10", "--set", "train.checkpoint_every=60", "--set", "log.tensorboard=false"]
NAMES = ("resnet8-s0", "resnet8-s1")


def _controlling_terminal() -> None:
    """In the child: a session of its own with the pty (its stdin) as controlling terminal, so
    that a typed Ctrl-C goes to its foreground process group, as in a terminal window."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command on a pseudo-terminal of 100 columns; `type` writes keys, `text` is what it showed."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "resnetdist", *args], cwd=REPO,
                                     env=cli_env(COLUMNS="100", TERM="xterm"), stdin=slave, stdout=slave,
                                     stderr=slave, preexec_fn=_controlling_terminal)
        os.close(slave)
        self.text = ""

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the process exited
                return
            if not data:
                return
            self.text += data.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.5)
        self.read(0.5)
        try:
            return self.proc.wait(timeout=1)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
            os.close(self.master)


def newest_iteration(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line).get("iter", 0) for line in lines if line.endswith("}")), default=0)


def evaluations(run_dir: Path) -> list[tuple[int, float, float]]:
    """(iteration, train loss, test error) of every evaluation record, the later of any repeated one."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "test_error" in r:
            records[r["iter"]] = (r["iter"], r["train_loss"], r["test_error"])
    return [records[k] for k in sorted(records)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_ctrl_c_in_the_terminal_stops_the_suite_at_a_checkpoint_and_the_rerun_ends_as_if_not(tmp_path, tiny_data):
    data = ["--data-dir", str(tiny_data)]
    run_cli([*SUITE, *data, "--out", str(tmp_path / "whole")], timeout=300)

    out = tmp_path / "stopped"
    term = Terminal([*SUITE, *data, "--out", str(out)])
    deadline = time.monotonic() + 120
    while newest_iteration(out / NAMES[0]) < 10 and time.monotonic() < deadline:
        term.read(0.2)
    assert newest_iteration(out / NAMES[0]) >= 10, term.text
    # on a terminal, the running run's bar (read from its folder) under the suite's lines
    assert re.search(rf"{NAMES[0]}\s+\d+% \|#* *\| \d+/120", term.text), term.text
    # while it trains, both views say so: the lock is held, the newest record's iteration
    status = cli_in_process(["reproduce", "--status", str(out)]).stdout
    assert f"{NAMES[0]}  running      iteration" in status and " of 120 on " in status, status
    assert f"{NAMES[1]}  not started" in status and "2 run(s): 1 running, 1 not started" in status, status
    (listed,) = json.loads(cli_in_process(["runs", str(out), "--json"]).stdout)["runs"]
    assert listed["state"] == "running" and listed["pid"] and listed["iteration"] >= 10, listed
    pressed = time.monotonic()
    term.type(b"\x03")  # one Ctrl-C: the terminal sends SIGINT to the foreground group
    term.read(1.0)
    assert "no new run starts" in term.text, term.text  # acknowledged within a second
    code = term.wait(timeout=120)
    assert code == 130, term.text
    assert time.monotonic() - pressed < 60, term.text
    log = (out / NAMES[0] / "train.log").read_text()
    assert "interrupted: stopped on SIGINT at iteration" in log and "interrupted at once" not in log, log[-2000:]
    assert "FAIL" not in term.text and f"interrupted  {NAMES[0]}" in term.text, term.text
    assert "run the same command again" in term.text, term.text
    checkpoints = sorted((out / NAMES[0]).glob("ckpt_*.pt"))
    assert checkpoints and not (out / NAMES[0] / "summary.json").exists()
    assert not (out / NAMES[1]).exists()  # the second run was never started

    status = cli_in_process(["reproduce", "--status", str(out)]).stdout
    it = int(checkpoints[-1].name[5:12])
    assert f"{NAMES[0]}  interrupted  resumes from iteration {it}" in status, status

    rerun = run_cli([*SUITE, *data, "--out", str(out)], timeout=300)
    assert "(resuming)" in rerun.stdout and "report:" in rerun.stdout, rerun.stdout
    for name in NAMES:
        assert evaluations(out / name) == evaluations(tmp_path / "whole" / name), name
        whole = json.loads((tmp_path / "whole" / name / "summary.json").read_text())
        again = json.loads((out / name / "summary.json").read_text())
        assert again["test_error"] == whole["test_error"] and again["iterations"] == 120
        assert again["data_identity"] == "unknown"  # test data: no manifest of a verified download


def test_runs_names_failed_stopped_and_not_started_folders_from_their_files(tmp_path, tiny_data):
    """A folder's state from its files alone: a log ending in an error and an exit code (failed),
    a checkpoint and no word of why (stopped), a config alone (not started)."""
    config = "[optim]\niters = 100\n"
    failed, stopped, fresh = tmp_path / "failed", tmp_path / "stopped", tmp_path / "fresh"
    for folder in (failed, stopped, fresh):
        folder.mkdir()
        (folder / "config.toml").write_text(config)
    (failed / "train.log").write_text("=== 2026-01-01 00:00:00 python -m resnetdist train\n"
                                      "error: loss became NaN or inf at iteration 31\n"
                                      "=== 2026-01-01 00:01:00 exit code 3\n")
    (stopped / "ckpt_0000040.pt").write_bytes(b"")
    text = cli_in_process(["runs", str(tmp_path)]).stdout
    assert "  failed   failed       exit code 3: error: loss became NaN or inf at iteration 31; " \
           "no checkpoint: starts over" in text, text
    assert "  stopped  stopped      resumes from iteration 40" in text, text
    assert "  fresh    not started" in text and "3 run(s): 1 stopped, 1 failed, 1 not started" in text, text
    result = cli_in_process(["runs", str(tmp_path / "nothing")], check=False)
    assert result.exit_code == 2 and "no such folder" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_first_ctrl_c_of_train_is_answered_within_a_second_with_where_it_will_stop(tmp_path, tiny_data):
    """The stop point is 1,000 iterations away (log.log_every): the first Ctrl-C says so at once,
    the bar shows it, and a second one stops at once."""
    term = Terminal(["train", "--n", "1", "--iters", "5000", "--device", "cpu", "--data-dir", str(tiny_data),
                     "--out", str(tmp_path / "run"), "--set", "optim.batch_size=32", "--set", "log.log_every=1000",
                     "--set", "log.tensorboard=false"])
    deadline = time.monotonic() + 120
    moving = re.compile(r"\b[1-9]\d*/5000 \[")
    while not moving.search(term.text) and time.monotonic() < deadline:
        term.read(0.2)
    assert moving.search(term.text), term.text  # the bar moves: the loop runs
    term.type(b"\x03")
    pressed = time.monotonic()
    while "Ctrl-C again" not in term.text and time.monotonic() - pressed < 1.0:
        term.read(0.05)
    assert "stopping at iteration 1,000 to write a checkpoint (about " in term.text, term.text
    assert "; Ctrl-C again to stop now, without a checkpoint" in term.text, term.text
    term.read(1.5)
    assert "stopping at 1,000" in term.text.split("Ctrl-C again")[-1], term.text  # the bar says it
    term.type(b"\x03")
    assert term.wait(timeout=60) == 130, term.text
    assert "interrupted at once" in term.text, term.text
