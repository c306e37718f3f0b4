"""The device-side feed (data/epochs.py): each epoch's order and augmentation draws built once
and uploaded, each batch gathered by the step itself from its own iteration counter. It must
feed exactly what the per-step feed (loop.Feed: a loader batch and draw_params per iteration)
feeds, at every iteration, world size and resume point, with no per-iteration host work."""

from __future__ import annotations

import pytest
import torch

from resnetdist.config import load_config
from resnetdist.data import epochs as epochs_mod
from resnetdist.data import load_data, open_loaders
from resnetdist.data.augment import draw_params, training_mean
from resnetdist.data.epochs import Epochs, epochs_for
from resnetdist.data.resident import ResidentTrainLoader
from resnetdist.dist import DistContext
from resnetdist.train.loop import Feed, run_steps
from resnetdist.train.resolve import resolve
from resnetdist.train.schedule import lr_table
from resnetdist.train.step import build_step
from resnetdist.train.trainer import build, make_model

from .fake_cuda import FakeOps

B, SEED = 32, 3
CPU = torch.device("cpu")


def config(tiny_data):
    return resolve(load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": B},
                                      "train": {"device": "cpu", "seed": SEED}, "log": {"wandb_mode": "disabled"}}))


def per_step(tiny_data, first: int = 0, state: dict | None = None, **kw):
    """The step as it was fed before: no source, a batch and draw_params handed in per iteration."""
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, DistContext(0, 0, 1, CPU))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    step = build_step(model, optimizer, mean, lr_table(cfg, 1), precision="fp32", batch_per_rank=B,
                      start_iter=first, **kw)
    loader = open_loaders(cfg.data, data, DistContext(0, 0, 1, CPU), B, SEED).train
    return step, Feed(loader, SEED, B, out=step.inputs.out if step.inputs else None)


def device_fed(tiny_data, first: int = 0, state: dict | None = None):
    cfg = config(tiny_data)

    def restore(model, optimizer):
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        return first

    return build(cfg, DistContext(0, 0, 1, CPU), load_data(cfg.data), restore)


def assert_bitwise(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.timeout(300)
def test_the_device_fed_step_trains_bitwise_as_the_per_step_fed_one_and_resumes_so(tiny_data):
    trainer = device_fed(tiny_data)
    assert trainer.step.source is not None and trainer.feed is trainer.step.source
    steps = trainer.step.source.steps  # 1000 images / 32: 31 per epoch; 70 iterations cross two boundaries
    old, feed = per_step(tiny_data)
    trainer.run(45)
    run_steps(old, feed.batches(0), 45)
    assert_bitwise(trainer.model, old.model)
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    resumed = device_fed(tiny_data, 45, state)  # mid-epoch, as a checkpoint resumes
    assert resumed.step.source.loaded == 45 // steps
    resumed.run(25, first=45)
    run_steps(old, feed.batches(45), 25)
    assert_bitwise(resumed.model, old.model)


@pytest.mark.timeout(300)
def test_a_graphed_device_fed_step_replays_with_no_arguments_and_gathers_in_the_graph(tiny_data):
    """Through a stand-in for torch.cuda's graphs (a replay runs the captured body): the replay
    gets no batch, copies nothing into its inputs, and trains as the per-step eager step."""
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, DistContext(0, 0, 1, CPU))
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    source = epochs_for(open_loaders(cfg.data, data, DistContext(0, 0, 1, CPU), B, SEED).train, SEED, B, 0, 1)
    source.load(0)
    graphed = build_step(model, optimizer, mean, lr_table(cfg, 1), precision="fp32", batch_per_rank=B, graph=True,
                         ops=FakeOps(), source=source)
    assert graphed.kind == "graph" and int(graphed.it) == 0
    old, feed = per_step(tiny_data)
    run_steps(graphed, source.batches(0), 40)
    run_steps(old, feed.batches(0), 40)
    assert_bitwise(graphed.model, old.model)
    assert graphed.inputs.copies == 0 and source.uploads == 2


def test_every_iteration_gathers_the_per_step_feeds_batch_and_draws(tiny_data):
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    for world in (1, 2):
        for rank in range(world):
            ctx = DistContext(rank, rank, world, CPU)
            epochs = Epochs(ResidentTrainLoader(data.train, B, SEED, rank, world, CPU), SEED, B, rank, world)
            reference = Feed(ResidentTrainLoader(data.train, B, SEED, rank, world, CPU), SEED, B, rank, world)
            feed, it = epochs.batches(29), torch.tensor(29)
            for want in zip(range(29, 100), reference.batches(29)):
                next(feed)  # loads the epoch at its first iteration
                got = epochs.batch(it)
                for g, w in zip(got, want[1]):
                    assert torch.equal(g, w), (ctx, int(it))
                it += 1


def test_no_draws_or_uploads_between_epoch_boundaries(tiny_data, monkeypatch):
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    epochs = Epochs(ResidentTrainLoader(data.train, B, SEED, 0, 1, CPU), SEED, B)
    calls = []
    monkeypatch.setattr(epochs_mod, "draw_params", lambda *a: calls.append(a[1]) or draw_params(*a))
    feed = epochs.batches(0)
    assert next(feed) == () and len(calls) == epochs.steps  # the whole epoch, at its start
    for _ in range(epochs.steps - 1):
        assert next(feed) == ()
    assert len(calls) == epochs.steps and epochs.uploads == 1  # nothing per iteration
    next(feed)
    assert calls[epochs.steps:] == list(range(epochs.steps, 2 * epochs.steps)) and epochs.uploads == 2


def test_ffcv_or_other_loaders_keep_the_per_step_feed():
    assert epochs_for(object(), SEED, B, 0, 1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_cuda_epochs_upload_from_pinned_memory_and_gather_as_on_the_cpu(tiny_data):
    cfg = config(tiny_data)
    data = load_data(cfg.data)
    cpu = Epochs(ResidentTrainLoader(data.train, B, SEED, 0, 1, CPU), SEED, B)
    gpu = Epochs(ResidentTrainLoader(data.train, B, SEED, 0, 1, torch.device("cuda")), SEED, B)
    it_cpu, it_gpu = torch.tensor(0), torch.tensor(0, device="cuda")
    feeds = cpu.batches(0), gpu.batches(0)
    for _ in range(3 * cpu.steps):
        next(feeds[0]), next(feeds[1])
        for a, b in zip(cpu.batch(it_cpu), gpu.batch(it_gpu)):
            assert torch.equal(a, b.cpu())
        it_cpu += 1
        it_gpu += 1
