"""The data's feed (data/feed.py) and its device-side epochs (data/epochs.py): every iteration's
batch and draws are those of data/order.py and data/augment.draw_block, at every world size,
resume point and pack member; each epoch's numbers are built once, the next ahead on a thread;
a graphed step captured with the feed's buffers replays with no copy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from resnetdist.config import load_config
from resnetdist.data import epochs as epochs_mod
from resnetdist.data import feed as feed_mod
from resnetdist.data import load_data
from resnetdist.data.augment import draw_block
from resnetdist.data.feed import Feed
from resnetdist.data.order import rank_epoch_order
from resnetdist.data.resident import ResidentTrainLoader
from resnetdist.dist import DistContext
from resnetdist.training import graph as graph_mod
from resnetdist.training.graph import StaticInputs
from resnetdist.training.loop import Progress, take_steps
from resnetdist.training.step import StepChoice
from resnetdist.training.trainer import build

from .fake_cuda import FakeOps
from .helpers import EAGER, feed_and_step

B, SEED = 32, 3
CPU = torch.device("cpu")


def config(tiny_data):
    return load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": B},
                              "train": {"device": "cpu", "seed": SEED}, "log": {"wandb_mode": "disabled"}})


def trainer_at(tiny_data, state: dict | None = None):
    cfg = config(tiny_data)
    trainer = build(cfg, DistContext(0, 0, 1, CPU), load_data(cfg.data))
    if state is not None:
        trainer.load_state_dicts([state])  # as a resumed run loads its checkpoint
    return trainer


def assert_bitwise(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def expected(split, seeds: list[int], it: int, rank: int, world: int):
    """Iteration `it`'s batch and draws of each seed, from the order and the draws alone."""
    iters, b = len(split) // B, B // world
    epoch, pos = divmod(it, iters)
    rows = [rank_epoch_order(len(split), B, s, epoch, rank, world)[pos * b:(pos + 1) * b] for s in seeds]
    draws = [draw_block(s, it, 1, B, rank, world)[0] for s in seeds]
    x, y, aug = (torch.from_numpy(np.stack(a)) for a in
                 ([split.images[r] for r in rows], [split.labels[r] for r in rows], draws))
    return (x[0], y[0], aug[0]) if len(seeds) == 1 else (x, y, aug)


def test_every_iteration_feeds_its_order_and_draws_at_every_world_size_and_pack_member(tiny_data):
    data = load_data(config(tiny_data).data)
    for seeds, world in (([SEED], 1), ([SEED], 2), ([SEED, 4], 1)):
        for rank in range(world):
            feed = Feed(ResidentTrainLoader(data.train, B, seeds, rank, world, CPU))
            for it, got in zip(range(29, 70), feed.batches(29)):  # mid-epoch, across an epoch boundary (31 per epoch)
                assert all(g is i for g, i in zip(got, feed.inputs))  # the same buffers, refilled
                for g, want in zip(got, expected(data.train, seeds, it, rank, world)):
                    assert torch.equal(g, want), (seeds, rank, world, it)


@pytest.mark.timeout(300)
def test_a_resumed_run_trains_bitwise_as_the_run_that_went_on(tiny_data):
    straight, stopped = trainer_at(tiny_data), trainer_at(tiny_data)
    take_steps(straight.step, straight.feed.batches(0), 70)  # 1000 images / 32: 31 per epoch, two boundaries
    take_steps(stopped.step, stopped.feed.batches(0), 45)
    stopped.members[0].progress = Progress(45)  # where fit() would stand
    resumed = trainer_at(tiny_data, stopped.state_dicts()[0])  # mid-epoch, as a checkpoint resumes
    take_steps(resumed.step, resumed.feed.batches(45), 25)
    assert_bitwise(resumed.model, straight.model)


@pytest.mark.timeout(300)
def test_a_graph_captured_with_the_feeds_buffers_replays_with_no_copy_and_trains_as_eager(tiny_data, monkeypatch):
    """Through a stand-in for torch.cuda's graphs (a replay runs the captured body): the feed's
    buffers are the graph's inputs, so no batch is copied into them, and replays train as the
    eager step."""
    cfg = config(tiny_data)
    data, ctx = load_data(cfg.data), DistContext(0, 0, 1, CPU)
    monkeypatch.setattr(graph_mod, "cuda_ops", FakeOps())
    copied, real = [], StaticInputs.fill
    monkeypatch.setattr(StaticInputs, "fill", lambda self, *given: copied.extend(
        g is not s for g, s in zip(given, (self.x, self.y, self.aug))) or real(self, *given))
    steps = []
    for choice in (StepChoice("graph", "asked for by name (train.step)", "graph"), EAGER):
        feed, step = feed_and_step(cfg, data, ctx, [SEED], choice)
        take_steps(step, feed.batches(0), 40)
        steps.append(step)
    graphed, eager = steps
    assert graphed.kind == "graph" and graphed.inputs.x is not None and int(graphed.it) == 40
    assert copied == [False] * 3 * 40  # every replay read the feed's buffers in place
    assert_bitwise(graphed.model, eager.model)


def uploaded_draws(monkeypatch) -> list:
    """The draws (iters, 3, b) EpochTables upload to their device buffers from now on, one entry
    per epoch loaded."""
    seen, real = [], epochs_mod.upload

    def upload(dst, src):
        if dst.dim() == 3:
            seen.append(src)
        real(dst, src)

    monkeypatch.setattr(epochs_mod, "upload", upload)
    return seen


def test_the_next_epoch_is_built_ahead_and_the_boundary_only_uploads_it(tiny_data, monkeypatch):
    """Epoch 0 is built where the feed starts (nothing was ahead); epoch 1 on the epochs thread
    while epoch 0 trains, ready before the boundary; at the boundary the loop's thread only
    uploads it, bitwise what building it there would have given; nothing per iteration."""
    data = load_data(config(tiny_data).data)
    feed = Feed(ResidentTrainLoader(data.train, B, [SEED], 0, 1, CPU))
    iters, uploads, calls = feed.loader.iters_per_epoch, uploaded_draws(monkeypatch), []  # calls: (first, count, thread)
    monkeypatch.setattr(feed_mod, "draw_block",
                        lambda *a: calls.append((a[1], a[2], threading.current_thread().name)) or draw_block(*a))
    here = threading.current_thread().name
    batches = feed.batches(0)
    for _ in range(iters):
        next(batches)
    assert calls[:1] == [(0, iters, here)]
    deadline = time.monotonic() + 30
    while not (feed.draws.ahead[0] == 1 and feed.draws.ahead[1].done()):  # in a run: 390 steps of >= 2 ms vs a few ms
        assert time.monotonic() < deadline, "the next epoch was not built ahead"
        time.sleep(0.01)
    assert len(uploads) == 1 and calls == [(0, iters, here), (iters, iters, "resnetdist-epochs_0")]
    next(batches)  # the boundary: epoch 1 uploaded, not built here
    assert len(uploads) == 2 and [c for c in calls if c[2] == here] == calls[:1]
    assert torch.equal(feed.draws.table, torch.from_numpy(draw_block(SEED, iters, iters, B, 0, 1)))
    assert torch.equal(feed.loader.orders.table, torch.from_numpy(feed.loader.order(1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_cuda_epochs_upload_from_pinned_memory_and_feed_as_on_the_cpu(tiny_data):
    data = load_data(config(tiny_data).data)
    cpu, gpu = (Feed(ResidentTrainLoader(data.train, B, [SEED], 0, 1, d)) for d in (CPU, torch.device("cuda")))
    for a, b, _ in zip(cpu.batches(0), gpu.batches(0), range(3 * cpu.loader.iters_per_epoch)):
        for x, y in zip(a, b):
            assert torch.equal(x, y.cpu())
