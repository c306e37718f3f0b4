"""The device-side feed (data/epochs.py): each epoch's order and augmentation draws built once
and uploaded, each batch gathered by the step itself from its own iteration counter. It must
feed exactly what the per-step feed (loop.Feed: a loader batch and draw_params per iteration)
feeds, at every iteration, world size and resume point, with no per-iteration host work."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from resnetdist.config import load_config
from resnetdist.data import epochs as epochs_mod
from resnetdist.data import load_data, open_loaders
from resnetdist.data.augment import draw_block, draw_params, training_mean
from resnetdist.data.epochs import EpochTable, epoch_table_for
from resnetdist.data.resident import ResidentTrainLoader
from resnetdist.dist import DistContext
from resnetdist.data.feed import Feed
from resnetdist.training.loop import Progress, take_steps
from resnetdist.training.schedule import lr_table
from resnetdist.training import graph as graph_mod
from resnetdist.training.graph import StaticInputs
from resnetdist.training.step import StepChoice, build_step
from resnetdist.training.trainer import build, make_model

from .fake_cuda import FakeOps
from .helpers import EAGER

B, SEED = 32, 3
CPU = torch.device("cpu")


def config(tiny_data):
    return load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": B},
                              "train": {"device": "cpu", "seed": SEED}, "log": {"wandb_mode": "disabled"}})


def per_step(tiny_data, first: int = 0, state: dict | None = None, **kw):
    """The step as it was fed before: no source, a batch and draw_params handed in per iteration."""
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, DistContext(0, 0, 1, CPU))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    step = build_step(model, optimizer, mean, lr_table(cfg.optim, 1.0, 0), precision="fp32", batch_per_rank=B,
                      **{"choice": EAGER, **kw})
    step.it.fill_(first)
    loader = open_loaders(cfg.data, data, DistContext(0, 0, 1, CPU), B, SEED).train
    return step, Feed(loader, SEED, B, out=step.inputs.out if step.inputs else None)


def device_fed(tiny_data, state: dict | None = None):
    cfg = config(tiny_data)
    trainer = build(cfg, DistContext(0, 0, 1, CPU), load_data(cfg.data))
    if state is not None:
        trainer.load_state_dicts([state])  # as a resumed run loads its checkpoint
    return trainer


def assert_bitwise(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.timeout(300)
def test_the_device_fed_step_trains_bitwise_as_the_per_step_fed_one_and_resumes_so(tiny_data):
    trainer = device_fed(tiny_data)
    assert trainer.step.source is not None and trainer.feed is trainer.step.source
    steps = trainer.step.source.steps  # 1000 images / 32: 31 per epoch; 70 iterations cross two boundaries
    old, feed = per_step(tiny_data)
    take_steps(trainer.step, trainer.feed.batches(0), 45)
    take_steps(old, feed.batches(0), 45)
    assert_bitwise(trainer.model, old.model)
    trainer.members[0].progress = Progress(45)  # where fit() would stand
    resumed = device_fed(tiny_data, trainer.state_dicts()[0])  # mid-epoch, as a checkpoint resumes
    assert resumed.step.source.loaded == 45 // steps
    take_steps(resumed.step, resumed.feed.batches(45), 25)
    take_steps(old, feed.batches(45), 25)
    assert_bitwise(resumed.model, old.model)


@pytest.mark.timeout(300)
def test_a_graphed_device_fed_step_replays_with_no_arguments_and_gathers_in_the_graph(tiny_data, monkeypatch):
    """Through a stand-in for torch.cuda's graphs (a replay runs the captured body): the replay
    gets no batch, copies nothing into its inputs, and trains as the per-step eager step."""
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, DistContext(0, 0, 1, CPU))
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    uploads = uploaded_epochs(monkeypatch)
    source = epoch_table_for(open_loaders(cfg.data, data, DistContext(0, 0, 1, CPU), B, SEED).train, SEED, B, 0, 1)
    source.use_epoch(0)
    monkeypatch.setattr(graph_mod, "cuda_ops", FakeOps())  # the tests' stand-in for torch.cuda's graphs
    loads = []
    monkeypatch.setattr(StaticInputs, "fill", lambda *a: loads.append(a))
    graphed = build_step(model, optimizer, mean, lr_table(cfg.optim, 1.0, 0), precision="fp32", batch_per_rank=B,
                         choice=StepChoice("graph", "asked for by name (train.step)", "graph"), source=source)
    assert graphed.kind == "graph" and int(graphed.it) == 0
    old, feed = per_step(tiny_data)
    take_steps(graphed, source.batches(0), 40)
    take_steps(old, feed.batches(0), 40)
    assert_bitwise(graphed.model, old.model)
    assert loads == [] and len(uploads) == 2  # epochs 0 and 1 uploaded once each, nothing loaded into the graph's inputs from outside


def uploaded_epochs(monkeypatch) -> list:
    """The epochs' draws (steps, 3, b) EpochTables upload to their device buffers from now on,
    one entry per epoch loaded (its sample order goes with it)."""
    seen, real = [], epochs_mod.upload

    def upload(dst, src):
        if dst.dim() == 3:
            seen.append(src)
        real(dst, src)

    monkeypatch.setattr(epochs_mod, "upload", upload)
    return seen


def test_every_iteration_gathers_the_per_step_feeds_batch_and_draws(tiny_data):
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    for world in (1, 2):
        for rank in range(world):
            ctx = DistContext(rank, rank, world, CPU)
            epochs = EpochTable(ResidentTrainLoader(data.train, B, SEED, rank, world, CPU), SEED, B, rank, world)
            reference = Feed(ResidentTrainLoader(data.train, B, SEED, rank, world, CPU), SEED, B, rank, world)
            feed, it = epochs.batches(29), torch.tensor(29)
            for want in zip(range(29, 100), reference.batches(29)):
                next(feed)  # loads the epoch at its first iteration
                got = epochs.batch(it)
                for g, w in zip(got, want[1]):
                    assert torch.equal(g, w), (ctx, int(it))
                it += 1


def test_the_next_epoch_is_built_ahead_and_the_boundary_only_uploads_it(tiny_data, monkeypatch):
    """Epoch 0 is built where the feed starts (nothing was ahead); epoch 1 on the epochs thread
    while epoch 0 trains, ready before the boundary; at the boundary the loop's thread only
    uploads it, bitwise what building it there would have given; nothing per iteration."""
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    epochs = EpochTable(ResidentTrainLoader(data.train, B, SEED, 0, 1, CPU), SEED, B)
    uploads = uploaded_epochs(monkeypatch)
    calls = []  # (first iteration, count drawn, thread): one block of draws per epoch
    monkeypatch.setattr(epochs_mod, "draw_block",
                        lambda *a: calls.append((a[1], a[2], threading.current_thread().name)) or draw_block(*a))
    here = threading.current_thread().name
    feed = epochs.batches(0)
    assert next(feed) == () and calls[:1] == [(0, epochs.steps, here)]
    for _ in range(epochs.steps - 1):
        assert next(feed) == ()
    deadline = time.monotonic() + 30
    while not (epochs.ahead[0] == 1 and epochs.ahead[1].done()):  # in a run: 390 steps of >= 2 ms vs a few ms
        assert time.monotonic() < deadline, "the next epoch was not built ahead"
        time.sleep(0.01)
    assert len(uploads) == 1 and calls == [(0, epochs.steps, here), (epochs.steps, epochs.steps, "resnetdist-epochs_0")]
    next(feed)  # the boundary: epoch 1 uploaded, not built here
    assert len(uploads) == 2 and [c for c in calls if c[2] == here] == calls[:1]
    order, draws = EpochTable(ResidentTrainLoader(data.train, B, SEED, 0, 1, CPU), SEED, B).numbers(1)
    assert torch.equal(epochs.order, torch.from_numpy(order)) and torch.equal(epochs.aug, torch.from_numpy(draws))


def test_ffcv_or_other_loaders_keep_the_per_step_feed():
    assert epoch_table_for(object(), SEED, B, 0, 1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_cuda_epochs_upload_from_pinned_memory_and_gather_as_on_the_cpu(tiny_data):
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    cpu = EpochTable(ResidentTrainLoader(data.train, B, SEED, 0, 1, CPU), SEED, B)
    gpu = EpochTable(ResidentTrainLoader(data.train, B, SEED, 0, 1, torch.device("cuda")), SEED, B)
    it_cpu, it_gpu = torch.tensor(0), torch.tensor(0, device="cuda")
    feeds = cpu.batches(0), gpu.batches(0)
    for _ in range(3 * cpu.steps):
        next(feeds[0]), next(feeds[1])
        for a, b in zip(cpu.batch(it_cpu), gpu.batch(it_gpu)):
            assert torch.equal(a, b.cpu())
        it_cpu += 1
        it_gpu += 1
