"""Helpers several test modules share (no test module imports another: tests/test_structure.py
checks it): reading a run directory back, waiting on a background run, checking a drawn PNG,
and writing a run folder by hand for the report."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetdist import checkpoint
from resnetdist.training.step import StepChoice

from .conftest import REPO, cli_env

EAGER = StepChoice("eager", "asked for by name (train.step)", "eager")  # the plain step, as the tests build it

try:  # a stock PyTorch CUDA image may lack it: `pytest -m cuda` must still collect the modules using it
    import psutil
except ImportError:
    psutil = None

# ----- a run directory, read back -------------------------------------------------------------------


def feed_and_step(cfg, data, ctx, seeds: list[int], choice: StepChoice):
    """A feed and a step built as trainer.build builds them (the feed's buffers the step's
    inputs), for a step kind the plan does not choose on this CPU: a graph through the fake
    CUDA ops, a compiled pack. The seeds: one run's, or a pack's."""
    from resnetdist.data import open_loaders
    from resnetdist.data.augment import training_mean
    from resnetdist.data.feed import Feed
    from resnetdist.training.schedule import lr_table
    from resnetdist.training.step import build_step
    from resnetdist.training.trainer import make_model

    feed = Feed(open_loaders(cfg.data, data, ctx, cfg.optim.batch_size, seeds).train)
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    model, optimizer = make_model(cfg, ctx, seeds=seeds)
    step = build_step(model, optimizer, mean, lr_table(cfg.optim, 1.0, 0), precision="fp32", choice=choice,
                      inputs=feed.inputs)
    return feed, step


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "model.pt")["model"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def temp_files(folder: Path) -> list[str]:
    """What an interrupted checkpoint write would leave behind."""
    return sorted(p.name for p in folder.glob(".*.tmp-*"))  # checkpoint.atomic_write's `.NAME.tmp-PID`


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the first run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ----- the report's figures and hand-written runs ---------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def check_png(path: Path, min_size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    w, h = png_size(path)
    assert w >= min_size[0] and h >= min_size[1], (w, h)
    with Image.open(path) as im:
        assert im.size == (w, h)
        rgb = np.asarray(im.convert("RGB"))
    non_white = (rgb < 245).any(axis=2).mean()
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert 0.01 < non_white < 0.6, f"{path}: {non_white:.3f} of the pixels are drawn"
    assert colours > 20, f"{path}: only {colours} colours"
    return rgb


def write_fixture_run(root: Path, model: str, depth: int, plain: bool, seed: int, final: float,
                      iters: int = 64_000, finished: bool = True, points: int = 17,
                      data_identity: str | None = "cifar10", train_images: int | None = None,
                      data_dir: str = "/data/cifar") -> Path:
    """A run folder as `train` leaves it: metrics.jsonl (+ summary.json when finished, saying
    which data it trained on: verified CIFAR-10 unless told, None: the key is absent; and, when
    given, how many training images, with 10,000 test images)."""
    run = root / f"{model}-s{seed}"
    run.mkdir(parents=True)
    n = (depth - 2) // 6
    (run / "config.toml").write_text(
        f'[model]\nn = {n}\nplain = {str(plain).lower()}\n\n[optim]\niters = {iters}\n\n'
        f'[train]\nseed = {seed}\n\n[data]\ndir = "{data_dir}"\n'
    )
    steps = [round(iters * (i + 1) / points) for i in range(points)]
    if not finished:
        steps = steps[: points // 2]
    records = []
    for it in steps:
        frac = it / iters
        test = final + (60 - final) * math.exp(-6 * frac)
        records.append({"iter": it, "epoch": it / 391, "lr": 0.1 if frac < 0.5 else 0.01,
                        "train_loss": 2.0 * math.exp(-4 * frac), "train_error": max(0.5, test - 6 - 4 * frac),
                        "test_error": test, "images_per_second": 20_000.0, "train_seconds": it / 150})
    records[-1]["test_error"] = final
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        summary = {"name": f"{model}-s{seed}", "model": model, "depth": depth, "plain": plain, "seed": seed,
                   "iterations": iters, "test_error": final, "val_error": None,
                   "train_error": records[-1]["train_error"], "train_seconds": iters / 150,
                   "images_per_second": 20_000.0, "parameters": 270_000, "world_size": 1,
                   "global_batch": 128, "device": "NVIDIA H100", "precision": "bf16", "loader": "gpu"}
        if data_identity is not None:
            summary["data_identity"] = data_identity
        if train_images is not None:
            summary.update(train_images=train_images, test_images=10_000, val_images=0)
        (run / "summary.json").write_text(json.dumps(summary))
    return run


# ----- a run in the background, its processes found and ended by pid ------------------------------


def popen(cmd: list[str], logs: Path, session: bool = False, **env: str) -> subprocess.Popen:
    """A run in the background, its output in files (a pipe nobody reads would fill and stall it).
    Every test that starts one finds and kills its processes with psutil: skipped without it.
    session: in a process group of its own, as a shell runs a foreground job (Ctrl-C goes to the group)."""
    pytest.importorskip("psutil")
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(**env), stdout=open(logs / "stdout", "w"),
                            stderr=open(logs / "stderr", "w"), start_new_session=session)


def finish(proc: subprocess.Popen, logs: Path, timeout: float) -> tuple[int, str, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    return code, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL what the test started and is still alive (stopped ones too), by pid."""
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker of rank {rank}")
