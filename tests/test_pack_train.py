"""Packs end to end (`train --seeds`): K seeds of one net trained in one process as one fused
model (pack.py), each member written as a run like any other. In this process (the CLI through
typer's runner), ResNet-8 on the tiny data set, the fault tests' 30-iteration run (RESUMABLE),
so that member s0 is compared with the session's reference run of seed 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetdist import checkpoint
from resnetdist.config import load_config, read_toml
from resnetdist.data import load_data
from resnetdist.dist import DistContext
from resnetdist.training import graph as graph_mod
from resnetdist.training.loop import take_steps
from resnetdist.training.step import StepChoice

from .conftest import RESUMABLE, TINY, cli, cli_in_process, run_cli
from .fake_cuda import FakeOps
from .helpers import EAGER, assert_bitwise_equal, feed_and_step, final_weights, read_jsonl

PACK = [*RESUMABLE, "--seeds", "0,1"]
# float32: a grouped conv over two members sums in another order than one member's conv, so a
# member's numbers match its single run's to rounding (the float64 tests in test_pack.py show
# the exactness), and that rounding grows with the steps at lr 0.1, as between one net's NCHW
# and channels_last: the first window (iterations 1-15) to FIRST_RTOL, the next to LATER_RTOL
# (seeds 0 and 1 differ by several percent)
FIRST_RTOL, LATER_RTOL = 1e-4, 3e-3


def train(args: list, data: Path, out: Path, check: bool = True):
    return cli_in_process(["train", *map(str, args), "--data-dir", str(data), "--out", str(out)], check=check)


@pytest.fixture(scope="module")
def pack(tmp_path_factory, tiny_data) -> Path:
    """The parent folder of a two-member pack, trained uninterrupted (read only)."""
    out = tmp_path_factory.mktemp("pack") / "runs"
    train([*PACK, "--set", "log.tensorboard=true"], tiny_data, out)
    return out


@pytest.fixture(scope="module")
def alone_s1(tmp_path_factory, tiny_data) -> Path:
    """Seed 1 trained alone, as member s1 of the pack (read only)."""
    out = tmp_path_factory.mktemp("alone") / "resnet8-s1"
    train([*RESUMABLE, "--seed", "1"], tiny_data, out)
    return out


def cut_back(source: Path, dest: Path, iteration: int) -> Path:
    """A copy of a run folder as it stood when its checkpoint at `iteration` was its newest:
    later checkpoints, the final weights and the summary gone (a run stopped there)."""
    shutil.copytree(source, dest)
    for path in dest.glob("ckpt_*.pt*"):
        if int(path.name[5:12]) > iteration:
            path.unlink()
    for name in ("model.pt", "model.safetensors", "summary.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


def same_losses(run: Path, alone: Path) -> None:
    """The training losses logged by `run` are those of `alone` to float32 rounding (a pack's
    and a single run's sums differ in order: the float64 tests of test_pack.py show exactness;
    in float32 no two layouts stay bitwise equal over many steps, not even one net's NCHW and
    channels_last)."""
    losses = [[r["train_loss"] for r in read_jsonl(folder / "metrics.jsonl")] for folder in (run, alone)]
    assert len(losses[0]) == len(losses[1]) == 2
    assert losses[0][0] == pytest.approx(losses[1][0], rel=FIRST_RTOL)
    assert losses[0][1] == pytest.approx(losses[1][1], rel=LATER_RTOL)


@pytest.mark.timeout(240)
def test_a_pack_writes_each_seed_as_a_run_like_any_other(pack, alone_s1, reference_run, tiny_data):
    s0, s1 = pack / "resnet8-s0", pack / "resnet8-s1"
    for seed, run in enumerate((s0, s1)):
        assert {"config.toml", "resolved.toml", "metrics.jsonl", "summary.json", "model.pt", "model.safetensors",
                "ckpt_0000030.pt", "tb"} <= {p.name for p in run.iterdir()}
        assert read_toml(run / "config.toml")["train"]["seed"] == seed
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["name"], summary["seed"], summary["iterations"]) == (f"resnet8-s{seed}", seed, 30)
        assert summary["pack"] == 2 and summary["global_batch"] == 32  # the batch of each member
        weights = checkpoint.load(run / "model.pt")
        assert weights["model"]["conv.weight"].shape == (16, 3, 3, 3)  # the single net's format and keys
        result = cli_in_process(["eval", str(run / "model.pt"), "--data-dir", str(tiny_data), "--json"])
        assert json.loads(result.stdout.strip().splitlines()[-1])["test_error"] == summary["test_error"]
    # each member trains as its seed alone: the first logged training loss (and the rest) to float32 rounding
    for run, alone in ((s0, reference_run(RESUMABLE)), (s1, alone_s1)):
        assert [r["iter"] for r in read_jsonl(run / "metrics.jsonl")] == [15, 30]
        same_losses(run, alone)
    listed = json.loads(cli(["runs", "--json", pack]).stdout)["runs"]  # (the report: the reproduce --pack test)
    assert sorted((r["name"], r["state"]) for r in listed) == [("resnet8-s0", "done"), ("resnet8-s1", "done")]


@pytest.mark.timeout(240)
def test_a_pack_resumes_itself_runs_started_alone_and_the_other_way_round(pack, alone_s1, reference_run, tiny_data,
                                                                          tmp_path):
    # the pack stopped at its checkpoint of iteration 20 and rerun: bitwise the uninterrupted pack
    again = tmp_path / "again"
    for run in ("resnet8-s0", "resnet8-s1"):
        cut_back(pack / run, again / run, 20)
    resumed = train(PACK, tiny_data, again)
    assert resumed.stdout.count("resuming from ckpt_0000020.pt (iteration 20 of 30)") == 2
    for run in ("resnet8-s0", "resnet8-s1"):
        assert_bitwise_equal(final_weights(pack / run), final_weights(again / run))
        assert read_jsonl(again / run / "metrics.jsonl")[0] == read_jsonl(pack / run / "metrics.jsonl")[0]
    # two runs started alone (stopped at 10) finish as one pack
    mixed = tmp_path / "mixed"
    cut_back(reference_run(RESUMABLE), mixed / "resnet8-s0", 10)
    cut_back(alone_s1, mixed / "resnet8-s1", 10)
    assert train(PACK, tiny_data, mixed).stdout.count("resuming from ckpt_0000010.pt (iteration 10 of 30)") == 2
    for run, alone in (("resnet8-s0", reference_run(RESUMABLE)), ("resnet8-s1", alone_s1)):
        same_losses(mixed / run, alone)
    # a pack member stopped at 20 finishes alone
    lone = cut_back(pack / "resnet8-s1", tmp_path / "lone", 20)
    assert "resuming from ckpt_0000020.pt" in train([*RESUMABLE, "--seed", "1"], tiny_data, lone).stdout
    same_losses(lone, alone_s1)


@pytest.mark.timeout(240)
def test_a_member_whose_loss_turns_nan_stops_alone(pack, tiny_data, tmp_path):
    """Member s1 resumes from a checkpoint whose weights hold a NaN: it is stopped and reported,
    its folder says it failed, and s0 trains to exactly the numbers of the uninterrupted pack."""
    out = tmp_path / "runs"
    for run in ("resnet8-s0", "resnet8-s1"):
        cut_back(pack / run, out / run, 10)
    bad = out / "resnet8-s1" / "ckpt_0000010.pt"
    state = checkpoint.load(bad)
    state["model"]["fc.weight"][0, 0] = float("nan")
    checkpoint.atomic_save(state, bad)  # with its checksum, as a run writes it
    result = train(PACK, tiny_data, out, check=False)
    assert result.exit_code == 3, result.stdout + result.stderr
    assert "resnet8-s1: loss became NaN or inf at iteration 11" in result.stderr
    assert_bitwise_equal(final_weights(pack / "resnet8-s0"), final_weights(out / "resnet8-s0"))
    assert not (out / "resnet8-s1" / "summary.json").exists()
    listed = {r["name"]: r["state"] for r in json.loads(cli(["runs", "--json", out]).stdout)["runs"]}
    assert listed == {"resnet8-s0": "done", "resnet8-s1": "failed"}


def test_seeds_refuses_what_cannot_pack(tiny_data, tmp_path):
    for extra, words in ((["--seeds", "0,0"], "train.seed"), (["--seeds", "0,1", "--set", "log.name=x"], "log.name"),
                         (["--seeds", "0,x"], "--seeds"), (["--seeds", "0,1", "--seed", "2"], "--seed")):
        result = train([*RESUMABLE, *extra], tiny_data, tmp_path / "out", check=False)
        assert result.exit_code == 2 and words in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a suite starts its runs as processes
@pytest.mark.timeout(240)
def test_reproduce_pack_trains_a_nets_seeds_in_one_process_and_reports_as_unpacked(pack, tiny_data, tmp_path):
    out = tmp_path / "suite"
    result = cli(["reproduce", "--depths", "8", "--resnet", "--seeds", "2", "--pack", "2", "--device", "cpu",
                  "--data-dir", tiny_data, "--out", out, *TINY[4:], *RESUMABLE[len(TINY):]])
    assert "[1/1] start resnet8-s0 + resnet8-s1 as one fused model" in result.stdout, result.stdout
    assert "packed with resnet8-s0" in (out / "resnet8-s1" / "train.log").read_text()
    for run in ("resnet8-s0", "resnet8-s1"):  # the same runs as `train --seeds 0,1`
        assert_bitwise_equal(final_weights(pack / run), final_weights(out / run))
    # the suite's report, as of any suite: a table row per run, their folders named
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| resnet8-s")]
    assert len(rows) == 2 and all(f"/{run}`" in row for row, run in zip(rows, ("resnet8-s0", "resnet8-s1"))), rows


@pytest.mark.timeout(120)
def test_a_graphed_pack_captured_with_the_feeds_rows_trains_as_the_eager_pack(tiny_data, monkeypatch):
    """The whole-step graph of a pack, through the tests' stand-in for torch.cuda's graphs (a
    replay runs the captured body), captured with the feed's (K, b, ...) buffers: each member's
    batch gathered from its own seed's epochs, bitwise the eager pack."""
    cfg = load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": 32},
                             "train": {"device": "cpu"}, "log": {"wandb_mode": "disabled"}})
    data, ctx = load_data(cfg.data), DistContext(0, 0, 1, torch.device("cpu"))
    monkeypatch.setattr(graph_mod, "cuda_ops", FakeOps())
    steps = []
    for choice in (StepChoice("graph", "asked for by name (train.step)", "graph"), EAGER):
        feed, step = feed_and_step(cfg, data, ctx, [0, 1], choice)
        take_steps(step, feed.batches(0), 6)
        steps.append(step)
    graphed, eager = steps
    assert graphed.kind == "graph" and graphed.inputs.x.shape[:2] == (2, 32)
    assert_bitwise_equal(graphed.model.state_dict(), eager.model.state_dict())


@pytest.mark.timeout(120)
def test_a_pack_reads_each_members_ffcv_order(tiny_data, tmp_path):
    """data.loader = ffcv: each member reads its own seed's order and augmentation from the
    .beton (one FFCV Loader per member, data/ffcv_loader.FfcvTrainLoader), so the pack's first
    logged losses are those of the single ffcv runs of seeds 0 and 1."""
    args = [*TINY, "--iters", "1", "--loader", "ffcv", "--set", "log.log_every=1", "--set", "train.eval_every=1",
            "--set", f"data.beton_dir={tmp_path / 'beton'}"]
    train([*args, "--seeds", "0,1"], tiny_data, tmp_path / "pack")
    for seed in (0, 1):
        train([*args, "--seed", seed], tiny_data, tmp_path / f"alone{seed}")
        losses = [[r["train_loss"] for r in read_jsonl(folder / "metrics.jsonl")]
                  for folder in (tmp_path / "pack" / f"resnet8-s{seed}", tmp_path / f"alone{seed}")]
        assert len(losses[0]) == len(losses[1]) >= 1
        assert losses[0] == pytest.approx(losses[1], rel=FIRST_RTOL), (seed, losses)
    seed0, seed1 = (read_jsonl(tmp_path / f"alone{s}" / "metrics.jsonl")[0]["train_loss"] for s in (0, 1))
    assert seed0 != seed1  # the members' orders differ: the comparison above could tell them apart


@pytest.mark.slow  # torch.compile builds the pack's kernels (tens of seconds on a small CPU)
@pytest.mark.timeout(300)
def test_a_compiled_pack_steps_each_member_as_the_eager_pack(tiny_data):
    """train.step = compile with a pack: torch.compile of the fused model (grouped convs, the
    members' batches in (K, b, ...) rows) gives each member the eager pack's losses over 2 steps,
    to float32 rounding (the compiler's kernels sum in their own order)."""
    cfg = load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": 32},
                             "train": {"device": "cpu"}, "log": {"wandb_mode": "disabled"}})
    data, ctx = load_data(cfg.data), DistContext(0, 0, 1, torch.device("cpu"))
    results = []
    for choice in (StepChoice("compile", "asked for by name (train.step)", "compile"), EAGER):
        feed, step = feed_and_step(cfg, data, ctx, [0, 1], choice)
        batches = feed.batches(0)
        losses = []
        for _ in range(2):
            take_steps(step, batches, 1)
            stats, bad = step.drain()
            losses.append(stats[:, 0] / stats[:, 2])  # each member's mean loss of the step
        assert step.kind == choice.kind and (bad == -1).all()
        results.append(torch.tensor(np.array(losses)))
    compiled, eager = results
    assert compiled[0, 0] != compiled[0, 1]  # two members with their own numbers
    torch.testing.assert_close(compiled, eager, rtol=FIRST_RTOL, atol=0)


@pytest.mark.slow  # two 2-rank runs (torchrun + gloo)
@pytest.mark.timeout(300)
def test_a_pack_under_ddp_matches_each_seeds_two_rank_run(tiny_data, reference_run, tmp_path):
    """--nproc-per-node 2 with a pack: every rank holds the fused model and its shard of each
    member's batch; member s0's first logged loss is that of seed 0's 2-rank run alone."""
    args = [*TINY, "--iters", "4", "--set", "log.log_every=2", "--set", "train.eval_every=4"]
    alone = reference_run([*args, "--seed", "0"], nproc=2)
    run_cli(["train", *args, "--seeds", "0,1", "--nproc-per-node", "2", "--data-dir", str(tiny_data),
             "--out", str(tmp_path / "pack")], timeout=240)
    member, single = (read_jsonl(folder / "metrics.jsonl") for folder in (tmp_path / "pack" / "resnet8-s0", alone))
    assert json.loads((tmp_path / "pack" / "resnet8-s0" / "summary.json").read_text())["world_size"] == 2
    print(f"pack member s0 under 2 ranks: first loss {member[0]['train_loss']}, seed 0 alone: {single[0]['train_loss']}")
    assert member[0]["train_loss"] == pytest.approx(single[0]["train_loss"], rel=FIRST_RTOL), (member, single)
    other = read_jsonl(tmp_path / "pack" / "resnet8-s1" / "metrics.jsonl")
    assert other[0]["train_loss"] != member[0]["train_loss"]
