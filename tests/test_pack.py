"""Packs (pack.py, models.py with members = K): K seeds of one net trained as one fused model,
each member exactly as if it trained alone. In float64 where exactness is the claim; ResNet-8,
small batches, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetdist.config import ModelConfig
from resnetdist.data.augment import augment, draw_block
from resnetdist.models import BasicBlock, CifarResNet, ZeroPadShortcut, build_model
from resnetdist.pack import (build_pack, fuse_optimizer_states, fuse_states, member_losses, split_optimizer_state,
                             split_state)
from resnetdist.training.optim import TensorLRSGD
from resnetdist.training import graph as graph_mod
from resnetdist.training.step import StepChoice, build_step

from .conftest import cli_in_process
from .fake_cuda import FakeOps
from .helpers import EAGER

CL = torch.channels_last
F64 = torch.float64
B = 8
SEEDS = [0, 1, 2]


def single(cfg: ModelConfig, seed: int, dtype=F64, memory_format=torch.contiguous_format) -> nn.Module:
    torch.manual_seed(seed)  # as trainer.make_model builds a run's net
    return build_model(cfg).to(dtype=dtype, memory_format=memory_format)


def sgd(model: nn.Module, dtype=F64) -> TensorLRSGD:
    return TensorLRSGD(model.parameters(), torch.tensor(0.1, dtype=dtype), 0.9, 1e-4)


def member_batches(steps: int, k: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images (steps, K, B, 3, 32, 32) and labels (steps, K, B): member j's own batches."""
    g = torch.Generator().manual_seed(123)
    return (torch.randn(steps, k, B, 3, 32, 32, generator=g, dtype=dtype),
            torch.randint(0, 10, (steps, k, B), generator=g))


def fused_input(x: torch.Tensor, stem_channels: int = 3) -> torch.Tensor:
    """(K, B, 3, 32, 32) -> (B, K*c, 32, 32): member j in its own channel slice."""
    x = x.transpose(0, 1)
    if stem_channels == 4:
        x = F.pad(x, (0, 0, 0, 0, 0, 1))
    return x.flatten(1, 2)


def train_apart(cfg, xs, ys, memory_format=torch.contiguous_format):
    """K single runs, each alone: (models, optimizers, losses (steps, K))."""
    models = [single(cfg, s, memory_format=memory_format) for s in SEEDS[:xs.shape[1]]]
    opts = [sgd(m) for m in models]
    losses = torch.zeros(xs.shape[:2], dtype=F64)
    for i in range(xs.shape[0]):
        for j, (m, opt) in enumerate(zip(models, opts)):
            loss = F.cross_entropy(m(xs[i, j].contiguous(memory_format=memory_format)), ys[i, j])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[i, j] = loss.detach()
    return models, opts, losses


def train_packed(cfg, xs, ys, stem_channels=3, memory_format=torch.contiguous_format):
    pack = build_pack(cfg, SEEDS[:xs.shape[1]], stem_channels).to(dtype=F64, memory_format=memory_format)
    opt = sgd(pack)
    losses = torch.zeros(xs.shape[:2], dtype=F64)
    for i in range(xs.shape[0]):
        loss, losses[i] = member_losses(pack(fused_input(xs[i], stem_channels).contiguous(memory_format=memory_format)),
                                        ys[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return pack, opt, losses


def max_differences(pack, opt, models, opts) -> dict[str, float]:
    """Largest |fused - alone| over every member: weights, BN statistics, momentum."""
    worst = {"weights": 0.0, "bn_statistics": 0.0, "momentum": 0.0}
    for j, (state, momentum) in enumerate(zip(split_state(pack.state_dict(), len(models)),
                                              split_optimizer_state(opt.state_dict(), len(models)))):
        for key, alone in models[j].state_dict().items():
            assert state[key].shape == alone.shape, key
            kind = "bn_statistics" if "running" in key else "weights"
            worst[kind] = max(worst[kind], (state[key].double() - alone.double()).abs().max().item())
        for idx, buf in opts[j].state_dict()["state"].items():
            d = (momentum["state"][idx]["momentum_buffer"] - buf["momentum_buffer"]).abs().max().item()
            worst["momentum"] = max(worst["momentum"], d)
    return worst


# ----- K = 1 is today's model ----------------------------------------------------------------------

# Recorded with the single-net code before packs existed (torch 2.13, x86 CPU, float64, one
# intra-op thread as conftest sets: the thread count changes the last bit of CPU reductions):
# ResNet-8 seed 0, three SGD steps (lr 0.1, momentum 0.9, wd 1e-4) on member_batches(3, 1);
# each step's loss, then the sum of |every state tensor|.
TODAY = {"A": (["0x1.7b934cdfbb97bp+1", "0x1.938a405150809p+1", "0x1.37948cb908932p+1"], "0x1.1fa40b42f642dp+12"),
         "B": (["0x1.f53d4fb9de728p+0", "0x1.5c8d1c9fa2631p+1", "0x1.550cbfb9f15afp+1"], "0x1.442deaa31dc7dp+12")}


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_one_member_is_todays_model_and_trains_to_todays_numbers_bitwise(shortcut):
    cfg = ModelConfig(n=1, shortcut=shortcut)
    torch.manual_seed(0)
    plain = CifarResNet(cfg)
    pack = build_pack(cfg, [0])
    assert type(pack) is CifarResNet and pack.members == 1
    assert [type(m) for m in pack.modules()] == [type(m) for m in plain.modules()]
    assert {k: v.shape for k, v in pack.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(pack.state_dict().values(), plain.state_dict().values()))
    g = torch.Generator().manual_seed(123)
    xs, ys = torch.randn(3, 8, 3, 32, 32, generator=g, dtype=F64), torch.randint(0, 10, (3, 8), generator=g)
    model, losses = pack.double(), []
    opt = sgd(model)
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item().hex())
    total = sum(t.double().abs().sum() for t in model.state_dict().values()).item().hex()
    assert (losses, total) == (TODAY[shortcut][0], TODAY[shortcut][1])


def test_pack_members_start_from_their_single_runs_weights():
    cfg = ModelConfig(n=1)
    pack = build_pack(cfg, SEEDS)
    assert isinstance(pack.blocks[1].shortcut, ZeroPadShortcut) and isinstance(pack.blocks[0], BasicBlock)
    assert pack.conv.groups == 3 and pack.bn.num_features == 3 * 16
    for seed, state in zip(SEEDS, split_state(pack.state_dict(), 3)):
        alone = single(cfg, seed, dtype=torch.float32).state_dict()
        assert list(state) == list(alone)
        for key in alone:
            assert torch.equal(state[key], alone[key]), (seed, key)


def test_split_and_fuse_round_trip_bitwise_and_load_into_single_nets():
    cfg = ModelConfig(n=1, shortcut="B")
    xs, ys = member_batches(2, 3)
    pack, opt, _ = train_packed(cfg, xs, ys)  # momentum and BN statistics no longer trivial
    members = split_state(pack.state_dict(), 3)
    moments = split_optimizer_state(opt.state_dict(), 3)
    for key, value in fuse_states(members).items():
        assert torch.equal(value, pack.state_dict()[key]), key
    fused_opt = fuse_optimizer_states(moments)
    for idx, buf in opt.state_dict()["state"].items():
        assert torch.equal(fused_opt["state"][idx]["momentum_buffer"], buf["momentum_buffer"]), idx
    assert fused_opt["param_groups"] == opt.state_dict()["param_groups"]
    # a member's state is a single run's: loads strictly into today's net and optimizer
    alone = single(cfg, 9)
    alone.load_state_dict(members[1])
    alone_opt = sgd(alone)
    alone_opt.load_state_dict(moments[1])
    assert torch.equal(alone.fc.weight, pack.fc.weight[10:20])
    assert all(s.untyped_storage().nbytes() == s.numel() * s.element_size() for s in members[1].values())
    with pytest.raises(ValueError, match="num_batches_tracked"):
        fuse_states([members[0], {**members[1], "bn.num_batches_tracked": torch.tensor(7)}])


# ----- exactness in float64 --------------------------------------------------------------------


@pytest.mark.parametrize("shortcut,stem_channels,layout", [("A", 3, torch.contiguous_format), ("B", 3, torch.contiguous_format),
                                                          ("A", 4, CL)])
def test_fused_training_equals_separate_runs_in_float64(shortcut, stem_channels, layout):
    """After 1 and 3 SGD steps: every weight, momentum buffer and BN running statistic, and each
    member's loss, as if each member trained alone (same layout on both sides)."""
    cfg = ModelConfig(n=1, shortcut=shortcut)
    xs, ys = member_batches(3, 3)
    for steps, tol in ((1, 1e-12), (3, 1e-9)):
        models, opts, alone_losses = train_apart(cfg, xs[:steps], ys[:steps], layout)
        pack, opt, losses = train_packed(cfg, xs[:steps], ys[:steps], stem_channels, layout)
        worst = max_differences(pack, opt, models, opts)
        worst["losses"] = (losses - alone_losses).abs().max().item()
        assert max(worst.values()) < tol, (steps, worst)


def test_a_non_finite_member_leaves_every_other_member_unchanged():
    """NaN and inf in member 1's batch: members 0 and 2 train bitwise as in a pack without it."""
    cfg = ModelConfig(n=1)
    xs, ys = member_batches(2, 3)
    poisoned = xs.clone()
    poisoned[0, 1, :, 0] = float("nan")
    poisoned[1, 1, 3, 2, 5, 5] = float("inf")
    clean_pack, clean_opt, clean_losses = train_packed(cfg, xs, ys)
    pack, opt, losses = train_packed(cfg, poisoned, ys)
    assert torch.isfinite(losses[:, [0, 2]]).all() and not torch.isfinite(losses[:, 1]).any()
    assert torch.equal(losses[:, [0, 2]], clean_losses[:, [0, 2]])
    for j in (0, 2):
        for (key, a), b in zip(split_state(pack.state_dict(), 3)[j].items(), split_state(clean_pack.state_dict(), 3)[j].values()):
            assert torch.equal(a, b), (j, key)
        a_state, b_state = (split_optimizer_state(o.state_dict(), 3)[j]["state"] for o in (opt, clean_opt))
        assert all(torch.equal(a_state[i]["momentum_buffer"], b_state[i]["momentum_buffer"]) for i in a_state)


def test_float32_gradient_differs_from_separate_runs_no_more_than_a_layout_change_does():
    """No float32 equality is claimed: the fused kernels sum in another order. One step's
    gradient differs from the K runs' by no more than a small multiple of what NCHW vs
    channels_last changes in one run's."""
    cfg = ModelConfig(n=2)
    xs, ys = member_batches(1, 2, torch.float32)

    def grads(model, x, y, layout=torch.contiguous_format, packed=False):
        model = model.to(memory_format=layout)
        out = model(x.contiguous(memory_format=layout))
        (member_losses(out, y)[0] if packed else F.cross_entropy(out, y)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    alone = [grads(single(cfg, s, torch.float32), xs[0, j], ys[0, j]) for j, s in enumerate(SEEDS[:2])]
    layout_diff = (grads(single(cfg, 0, torch.float32), xs[0, 0], ys[0, 0], CL) - alone[0]).abs().max().item()
    pack = build_pack(cfg, SEEDS[:2])
    grads(pack, fused_input(xs[0]), ys[0], packed=True)
    fused = torch.cat([torch.cat([p.grad.chunk(2, 0)[j].flatten() for p in pack.parameters()]) for j in range(2)])
    pack_diff = (fused - torch.cat(alone)).abs().max().item()
    assert 0 < layout_diff and pack_diff <= 4 * layout_diff, (pack_diff, layout_diff)


# ----- the step ---------------------------------------------------------------------------------


def uint8_batches(steps: int, k: int, b: int = B):
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (steps, k, b, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (steps, k, b), generator=g)
    aug = torch.from_numpy(np.stack([draw_block(SEEDS[j], 0, steps, b, 0, 1) for j in range(k)], axis=1))
    return images, labels, aug


def pack_step(cfg, k, kind="eager", lr=0.1, **kw):
    model = build_pack(cfg, SEEDS[:k])
    optimizer = TensorLRSGD(model.parameters(), torch.zeros(()), 0.9, 1e-4)
    mean = torch.full((3, 32, 32), 0.5)
    lead = (B,) if k == 1 else (k, B)  # a graph's inputs: a row per member
    inputs = (torch.zeros((*lead, 3, 32, 32), dtype=torch.uint8), torch.zeros(lead, dtype=torch.long),
              torch.zeros((*lead[:-1], 3, B), dtype=torch.long))
    return build_step(model, optimizer, mean, torch.full((10,), lr), choice=StepChoice(kind, "asked for by name", kind),
                      precision="fp32", inputs=inputs, **kw)


def test_one_member_step_is_todays_step_bitwise():
    """TrainStep on a one-seed pack against today's step written out (augment, mean
    cross-entropy, backward, SGD, sums)."""
    cfg = ModelConfig(n=1)
    images, labels, aug = uint8_batches(3, 1)
    step = pack_step(cfg, 1)
    model = single(cfg, 0, torch.float32)
    opt = TensorLRSGD(model.parameters(), torch.tensor(0.1), 0.9, 1e-4)
    sums = torch.zeros(3)
    for i in range(3):
        step(images[i, 0], labels[i, 0], aug[i, 0])
        logits = model(augment(images[i, 0], step.mean, aug[i, 0]).contiguous())
        loss = F.cross_entropy(logits, labels[i, 0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sums += torch.stack([loss.detach() * B, (logits.argmax(1) != labels[i, 0]).sum().float(), torch.tensor(B * 1.0)])
    for (key, a), b in zip(step.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
    stats, bad = step.drain()
    assert stats[0].tolist() == sums.double().tolist() and bad[0] == -1


def test_pack_step_reports_each_members_sums_and_its_first_non_finite_iteration():
    cfg = ModelConfig(n=1)
    images, labels, aug = uint8_batches(3, 3)
    step = pack_step(cfg, 3)
    with torch.no_grad():
        step.model.conv.weight[16:32] = float("nan")  # member 1 diverged
    for i in range(3):
        step(images[i], labels[i], aug[i])
    stats, bad = step.drain()
    assert bad.tolist() == [-1, 0, -1] and stats[:, 2].tolist() == [3 * B] * 3
    assert all(stats[j, 0] > 0 for j in (0, 2)) and not stats[1, 0] == stats[1, 0]
    # the members that stayed finite trained as a pack of them alone
    alone = pack_step(cfg, 3)
    for i in range(3):
        alone(images[i], labels[i], aug[i])
    for j in (0, 2):
        for (key, a), b in zip(split_state(step.model.state_dict(), 3)[j].items(),
                               split_state(alone.model.state_dict(), 3)[j].values()):
            assert torch.equal(a, b), (j, key)


def test_pack_step_matches_each_seeds_single_step():
    """Member j of a pack step sees seed j's augmentation and trains as seed j's single step
    (float32: to reordering noise)."""
    cfg = ModelConfig(n=1)
    images, labels, aug = uint8_batches(2, 2)
    step = pack_step(cfg, 2)
    for i in range(2):
        step(images[i], labels[i], aug[i])
    sums, _ = step.drain()
    for j in range(2):
        model = single(cfg, SEEDS[j], torch.float32)
        alone = build_step(model, TensorLRSGD(model.parameters(), torch.zeros(()), 0.9, 1e-4), step.mean,
                           torch.full((10,), 0.1), choice=EAGER, precision="fp32")
        for i in range(2):
            alone(images[i, j], labels[i, j], aug[i, j])
        for (key, a), b in zip(split_state(step.model.state_dict(), 2)[j].items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
        stats = alone.drain()[0][0]
        assert sums[j, 2] == stats[2] and sums[j, 0] == pytest.approx(stats[0], rel=1e-5)


def test_pack_graph_step_replays_as_the_eager_step(monkeypatch):
    """The whole-step graph (captured through the CPU stand-in for torch.cuda): warm-up state
    restored, replays train bitwise as the eager pack step, one input row per member."""
    cfg = ModelConfig(n=1)
    images, labels, aug = uint8_batches(3, 2)
    monkeypatch.setattr(graph_mod, "cuda_ops", FakeOps())  # the tests' stand-in for torch.cuda's graphs
    eager, graphed = pack_step(cfg, 2), pack_step(cfg, 2, kind="graph")
    assert graphed.kind == "graph" and graphed.inputs.x.shape == (2, B, 3, 32, 32) and graphed.inputs.aug.shape == (2, 3, B)
    for i in range(3):
        eager(images[i], labels[i], aug[i])
        graphed(images[i], labels[i], aug[i])
    for (key, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert all((a == b).all() for a, b in zip(eager.drain(), graphed.drain()))


def test_a_pack_refuses_fp16_and_duplicate_seeds():
    with pytest.raises(ValueError, match="each seed once"):
        build_pack(ModelConfig(n=1), [1, 1])
    model = build_pack(ModelConfig(n=1), [0, 1])
    with pytest.raises(ValueError, match="fp16 cannot train a pack"):
        build_step(model, TensorLRSGD(model.parameters(), torch.zeros(()), 0.9, 1e-4), torch.zeros(3, 32, 32),
                   torch.ones(2), choice=EAGER, precision="fp16")


# ----- bench --pack -----------------------------------------------------------------------------


@pytest.mark.slow  # four training steps at batch 128 and 256: seconds on 2 cores
@pytest.mark.timeout(120)
def test_bench_pack_times_the_pack_against_its_runs_alone_and_the_dense_ceiling(tmp_path):
    """One K on ResNet-8, one iteration per round: the three rows, their ratios, the JSON; a
    malformed --pack is one error line."""
    from resnetdist.tools.bench_pack import format_pack_table, run_pack_bench

    out = tmp_path / "pack.json"
    report = run_pack_bench(1, [2], iters=1, warmup=0, rounds=1, device_pref="cpu", out=out)
    (row,) = json.loads(out.read_text())["results"]
    assert report["complete"] and row["k"] == 2 and row["images_per_step"] == 256 and row["step"] == "eager"
    ips = row["images_per_second"]
    assert all(ips[name] > 0 for name in ("pack", "one_after_another", "dense"))
    assert row["pack_vs_one_after_another"] == pytest.approx(ips["pack"] / ips["one_after_another"])
    assert "| 2 |" in format_pack_table(report)
    result = cli_in_process(["bench", "--pack", "2,x"], check=False)
    assert result.exit_code == 2 and "error: --pack 2,x: pack sizes are whole numbers" in result.stderr
