"""What a person at a terminal sees of a run, through the real CLI: a header that says what runs
and from where, a bar that moves and that evaluation lines never break (under a pseudo-terminal,
as a terminal shows it), a short summary in words at the end (JSON behind --json), and a rerun of
a finished run that says so and does nothing else."""

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

from .conftest import REPO, TINY, cli_env, run_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"(\d+)/(\d+) \[")
COLUMNS = 80


def run_in_terminal(args: list[str], timeout: float = 240) -> tuple[int, list[tuple[float, str]]]:
    """The CLI with stdout and stderr on a pseudo-terminal of 80 columns (as a terminal window
    gives it); returns its exit status and what it wrote, read as it came, with the time."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    env = cli_env(COLUMNS=str(COLUMNS), TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "resnetdist", *args], cwd=REPO, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other end closed (the process exited)
                    break
                if not data:
                    break
                chunks.append((time.monotonic(), data.decode(errors="replace")))
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
    return code, chunks


def segments(text: str) -> list[str]:
    """What the terminal shows as separate writes: pieces between carriage returns and newlines."""
    return [s.rstrip() for s in re.split(r"[\r\n]", ANSI.sub("", text)) if s.strip()]


@pytest.mark.timeout(400)
def test_under_a_terminal_the_header_bar_evaluations_and_summary_keep_apart(tmp_path, tiny_data):
    """The first log point is 100 iterations in (several seconds): before it, the bar moves anyway (it used to sit
    at 0); evaluation lines come whole on their own lines (they used to land inside the bar:
    `...loss=1.898]iter 100`), the loss on the bar is whole at 80 columns, no bar is left behind
    after the end, and the run closes with its result in words, not JSON."""
    out = tmp_path / "run"
    code, chunks = run_in_terminal(["train", *TINY, "--iters", "200", "--set", "log.log_every=100",
                                    "--set", "train.eval_every=100", "--data-dir", str(tiny_data), "--out", str(out)])
    text = "".join(c for _, c in chunks)
    shown = segments(text)
    assert code == 0, text[-3000:]
    header = "\n".join(shown[:14])
    for fact in ("data            ", "(not verified as CIFAR-10: no manifest)",
                 "net             ResNet-8 (75,290 parameters)", "device          cpu, 1 rank", "step            eager",
                 "iterations      200", "batch per rank  32", f"run directory   {out}", "start           fresh start",
                 "estimate        about"):
        assert fact in header, header
    estimate = next(line for line in shown[:14] if "estimate" in line)
    assert len(estimate) <= COLUMNS and "2 evaluations included" in estimate, estimate
    evaluations = [s for s in shown if "train loss" in s]
    assert len(evaluations) == 2 and all(re.match(r"iter +\d+  lr ", s) for s in evaluations), evaluations
    assert all(re.search(r"train err \d+\.\d\d%  test err \d+\.\d\d%$", s) for s in evaluations), evaluations

    bars = [(t, int(m.group(1))) for t, c in chunks for m in BAR.finditer(ANSI.sub("", c))]
    before_first_log = sorted({n for _, n in bars if 0 < n < 100})
    assert len(before_first_log) >= 2, bars
    moves = [t for (t, n), (_, prev) in zip(bars[1:], bars) if n != prev]
    assert max(b - a for a, b in zip(moves, moves[1:])) < 10, bars  # at least every few seconds
    losses = [s for s in shown if BAR.search(s) and "loss" in s]
    assert losses and all(re.search(r"loss \d+\.\d{3} err \d+\.\d%", s) and len(s) <= COLUMNS for s in losses), losses

    closing = text[text.rindex("test error"):]
    assert not BAR.search(ANSI.sub("", closing)), closing  # the bar was cleared, not left above or below
    summary = json.loads((out / "summary.json").read_text())
    assert f"resnet8-s0: test error {summary['test_error']:.2f}% after 200 iterations" in text
    assert f"{out / 'model.pt'}" in closing and f"{out / 'summary.json'}" in closing
    assert f"resnetdist report {out}" in closing and '{"rank"' not in text


@pytest.mark.slow  # three runs of the CLI, one of them killed: about 20 s alone on 2 cores
@pytest.mark.timeout(400)
def test_a_run_says_where_it_starts_and_a_finished_run_only_says_it_is_finished(tmp_path, tiny_data):
    """Killed after iteration 25, the rerun says it resumes from the checkpoint at 20 (it used to
    say nothing about a fresh start, and a full path without the run's length). Run a third time,
    the finished run prints its result and does nothing else: no evaluation, no file touched, no
    second W&B run (it used to 'resume' at the end, evaluate again and open a new W&B run)."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--iters", "40", "--data-dir", str(tiny_data), "--out", str(out),
            "--set", "train.eval_every=20", "--set", "train.checkpoint_every=10", "--set", "log.wandb_mode=offline"]
    first = run_cli(args, check=False, kill_at=(25, 0))
    assert first.returncode == -9 and "start           fresh start" in first.stdout
    files = sorted(p for p in out.rglob("*"))
    planned = run_cli([*args, "--dry-run"])  # says where the run would resume, and touches nothing
    assert "start           resuming from ckpt_0000020.pt (iteration 20 of 40)" in planned.stdout
    assert sorted(p for p in out.rglob("*")) == files
    second = run_cli(args)
    assert "resuming from ckpt_0000020.pt (iteration 20 of 40)" in second.stdout
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    wandb_runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    third = run_cli(args)
    assert third.returncode == 0 and "holds a finished run (summary.json): nothing to do" in third.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert f"test error {summary['test_error']:.2f}%" in third.stdout and "iter " not in third.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (out / "wandb").glob("offline-run-*")) == wandb_runs
    as_json = run_cli([*args, "--json"])
    assert json.loads(as_json.stdout)["test_error"] == summary["test_error"]


def test_json_is_behind_a_flag(tmp_path, tiny_data):
    out = tmp_path / "run"
    args = ["train", *TINY, "--iters", "4", "--set", "train.eval_every=4", "--data-dir", str(tiny_data),
            "--out", str(out)]
    words = run_cli(args)
    assert "resnet8-s0: test error" in words.stdout and '{"rank"' not in words.stdout
    (out / "summary.json").unlink()  # a finished run answers from summary.json; train again
    for p in out.glob("ckpt_*"):
        p.unlink()
    line = run_cli([*args, "--json"]).stdout.strip().splitlines()[-1]
    assert json.loads(line)["rank"] == 0 and json.loads(line)["iterations"] == 4


def test_the_cpu_estimate_counts_the_evaluations():
    """On a short CPU run the evaluations of the test set cost as much as the training: the
    header's estimate counts them (it used to leave them out and promise a third of the time)."""
    from resnetdist.config import load_config
    from resnetdist.training.announce import cpu_estimate
    from resnetdist.training.plan import resolve

    cfg = load_config(None, {"model": {"n": 1}, "train": {"device": "cpu"}}, ["train.eval_every=20"], 400)
    plan = resolve(cfg, 1)
    odd = load_config(None, {"model": {"n": 1}, "train": {"device": "cpu"}}, ["train.eval_every=100"], 450)
    assert "16 evaluations" in cpu_estimate(cfg, plan, 80) and "5 evaluations" in cpu_estimate(odd, resolve(odd, 1), 0)
    with_evals, without = cpu_estimate(cfg, plan, 0, 10_000), cpu_estimate(cfg, plan, 0, 0)
    assert "20 evaluations included" in with_evals and with_evals != without, (with_evals, without)
