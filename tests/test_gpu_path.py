"""The GPU-path defects of issue 11, checked on the CPU where the logic allows it (the graph
capture through a stand-in for torch.cuda's streams and graphs), and on CUDA where it does not
(skipped without a GPU)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from resnetdist.errors import GRAPH_UNAVAILABLE, GraphUnavailable
from resnetdist.training import graph as graph_mod
from resnetdist.training import step as step_mod
from resnetdist.training import trainer as trainer_mod
from resnetdist.config import load_config
from resnetdist.data import load_data, open_loaders
from resnetdist.data.augment import training_mean
from resnetdist.dist import DistContext
from resnetdist.training import wrap as wrap_mod
from resnetdist.training.evaluate import error_rates
from resnetdist.training.loop import take_steps
from resnetdist.training.schedule import lr_table
from resnetdist.training.graph import GRAPH_WARMUP, StaticInputs
from resnetdist.training.step import StepChoice, build_step
from resnetdist.data.feed import Feed
from resnetdist.training import plan as plan_mod
from resnetdist.training.plan import resolve
from resnetdist.training.trainer import make_model

from .conftest import REPO, TINY, cli_env, cli_in_process, run_torchrun
from .fake_cuda import FakeOps
from .helpers import EAGER

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU = torch.device("cpu")
B = 32


def parts(tiny_data):
    cfg = load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": B},
                             "train": {"device": "cpu"}, "log": {"wandb_mode": "disabled"}})
    ctx = DistContext(0, 0, 1, CPU)
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, ctx)
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    loaders = open_loaders(cfg.data, data, ctx, B, [cfg.train.seed])
    return cfg, model, optimizer, mean, lr_table(cfg.optim, 1.0, 0), loaders


GRAPH = StepChoice("graph", "asked for by name (train.step)", "graph")
AUTO_GRAPH = StepChoice("graph", "auto: CUDA with fp32", "auto")  # what auto chooses on CUDA


def build(tiny_data, **kw):
    """A step, and the feed whose buffers it was built with (a graph's inputs)."""
    cfg, model, optimizer, mean, lrs, loaders = parts(tiny_data)
    feed = Feed(loaders.train)
    step = build_step(model, optimizer, mean, lrs, precision="fp32", inputs=feed.inputs, **{"choice": EAGER, **kw})
    return step, feed


@pytest.fixture
def fake_cuda(monkeypatch):
    """The tests' stand-in for torch.cuda's streams and graphs, in the one place capture reads
    them (graph.cuda_ops); FakeOps(fail=True) makes every capture fail."""

    def use(ops: FakeOps | None = None) -> FakeOps:
        ops = ops or FakeOps()
        monkeypatch.setattr(graph_mod, "cuda_ops", ops)
        return ops

    return use


@pytest.fixture
def copies(monkeypatch):
    """How many batches were copied into a graph's inputs (the feed it was built with copies none)."""
    seen = []
    real = StaticInputs.fill
    monkeypatch.setattr(StaticInputs, "fill", lambda self, x, *rest: seen.append(x is not self.x) or real(self, x, *rest))
    return seen


def drive(step, feed, count, first=0):
    take_steps(step, feed.batches(first), count)


def assert_same_weights(a, b):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


# ----- defect 1 (one side stream) and 8 (inputs gathered in place), on the CPU ---------------------


def test_ddp_warmup_and_capture_share_one_side_stream_and_replays_train_as_eager(tiny_data, monkeypatch, fake_cuda,
                                                                                 copies):
    ops, seen = fake_cuda(), {"ddp": [], "steps": [], "state": []}
    real_augment, real_state = step_mod.augment, step_mod.TrainStep.device_state
    monkeypatch.setattr(step_mod.TrainStep, "device_state",
                        lambda self: seen["state"].append(list(ops.joins)) or real_state(self))
    monkeypatch.setattr(wrap_mod, "DDP", lambda model, device_ids=None, **_: seen["ddp"].append(ops.current) or model)
    monkeypatch.setattr(step_mod, "augment", lambda *a: seen["steps"].append(ops.current) or real_augment(*a))
    graphed, feed = build(tiny_data, choice=GRAPH, ddp=True)
    (side,) = ops.made
    assert graphed.kind == "graph" and graphed.choice == GRAPH
    assert seen["ddp"] == [side]  # DDP built on the side stream ...
    assert seen["steps"] == [side] * (GRAPH_WARMUP + 1)  # ... warm-up and capture too
    assert ops.captures == [(side, side)]  # torch.cuda.graph(g, stream=side), entered on side
    # the pre-capture state was cloned after the default stream joined the side stream (DDP's
    # broadcast ran there), before the capture; the join after capture comes with the restore
    assert seen["state"] == [[(side, 0)]] and ops.joins == [(side, 0), (side, 1)]
    assert int(graphed.it) == 0  # warm-up and capture left no trace in the state
    monkeypatch.setattr(step_mod, "augment", real_augment)
    eager, eager_feed = build(tiny_data)
    drive(graphed, feed, 5)
    drive(eager, eager_feed, 5)
    assert_same_weights(graphed, eager)
    assert copies == [False] * 5  # the feed refilled the graph's inputs: no copy per batch


def test_a_failed_auto_capture_trains_eagerly_from_the_same_state_and_says_why(tiny_data, fake_cuda):
    fake_cuda(FakeOps(fail=True))
    failed, feed = build(tiny_data, choice=AUTO_GRAPH)
    eager, eager_feed = build(tiny_data)
    assert failed.kind == "eager" and failed.inputs is None and failed.choice.fell_back
    assert failed.choice.reason.startswith("auto: CUDA-graph capture failed (RuntimeError: CUDA error: operation "
                                           "not permitted when stream is capturing)")
    assert_same_weights(failed, eager)  # the warm-up steps were undone
    drive(failed, feed, 3)
    drive(eager, eager_feed, 3)
    assert_same_weights(failed, eager)


def test_a_failed_capture_of_a_graph_asked_for_by_name_stops_the_build(tiny_data, fake_cuda):
    fake_cuda(FakeOps(fail=True))
    with pytest.raises(GraphUnavailable, match=r"^train.step = graph: CUDA-graph capture failed \(RuntimeError: CUDA "
                                               r"error: operation not permitted when stream is capturing\)"):
        build(tiny_data, choice=GRAPH)


def test_graph_by_name_on_the_cpu_stops_before_training_with_one_line(tmp_path, tiny_data):
    out = tmp_path / "run"
    result = cli_in_process(["train", *TINY, "--iters", "4", "--data-dir", str(tiny_data),
                             "--out", str(out), "--set", "train.step=graph"], check=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: train.step = graph needs a CUDA device") and "train.step=auto" in line
    assert not out.exists()  # nothing written


def pretend_cuda_chose(monkeypatch, asked: str) -> None:
    """choose_kind as on a GPU (graph; the plan asks it), the rest of the run on the CPU through
    the fake ops."""
    choice = GRAPH if asked == "graph" else AUTO_GRAPH
    monkeypatch.setattr(plan_mod, "choose_kind", lambda *_: choice)


@pytest.mark.timeout(120)
def test_a_failed_capture_stops_graph_by_name_and_auto_records_eager_and_why(tmp_path, tiny_data, monkeypatch,
                                                                            fake_cuda):
    """Through the trainer and the CLI, a capture failure forced by the fake CUDA ops: graph by
    name exits 8 with one line and trains nothing; auto trains eagerly, and the header, the
    progress bar's label, summary.json, resolved.toml and report's runs table say so."""
    fake_cuda(FakeOps(fail=True))
    args = [*TINY, "--iters", "4", "--data-dir", str(tiny_data), "--set", "train.eval_every=4"]
    pretend_cuda_chose(monkeypatch, "graph")
    stopped = cli_in_process(["train", *args, "--out", str(tmp_path / "graph"), "--set", "train.step=graph"],
                             check=False)
    assert stopped.exit_code == GRAPH_UNAVAILABLE, stopped.output
    (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("error:")]
    assert "train.step = graph: CUDA-graph capture failed (RuntimeError" in line and "train.step=auto" in line
    assert not list((tmp_path / "graph").glob("ckpt_*")) and not (tmp_path / "graph" / "summary.json").exists()

    pretend_cuda_chose(monkeypatch, "auto")
    ran = cli_in_process(["train", *args, "--out", str(tmp_path / "auto")])
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["step"] == "eager" and summary["step_reason"].startswith("auto: CUDA-graph capture failed (")
    from resnetdist.config import read_toml

    resolved = read_toml(tmp_path / "auto" / "resolved.toml")["resolved"]  # the plan with the step that ran
    assert (resolved["step"], resolved["step_reason"], resolved["step_asked"]) == ("eager", summary["step_reason"], "auto")
    assert any(x.split()[:3] == ["step", "eager", "(auto:"] and "capture failed" in x for x in ran.stdout.splitlines())
    assert trainer_mod.step_label(step_mod.StepChoice("eager", summary["step_reason"], "auto")) == \
        "eager, graph capture failed"
    from resnetdist.suite.tables import step_cell

    assert step_cell(summary).startswith("eager (auto: CUDA-graph capture failed")


# ----- defect 7: loading into a built step keeps every address -------------------------------------


def test_loading_state_into_a_built_step_copies_in_place(tiny_data, fake_cuda):
    source, feed = build(tiny_data)
    drive(source, feed, 4)
    state = copy.deepcopy({"model": source.model.state_dict(), "optimizer": source.optimizer.state_dict()})
    fake_cuda()
    target, target_feed = build(tiny_data, choice=GRAPH)  # "captured" before the load
    momentum = [s["momentum_buffer"] for s in target.optimizer.state.values()]
    ptrs = [t.data_ptr() for t in [*target.model.state_dict().values(), *momentum]]
    target.load_state(state["model"], state["optimizer"], 4)
    now = [s["momentum_buffer"] for s in target.optimizer.state.values()]
    assert [t.data_ptr() for t in [*target.model.state_dict().values(), *now]] == ptrs
    assert all(a is b for a, b in zip(now, momentum))
    assert int(target.it) == 4
    for a, b in zip(source.optimizer.state.values(), target.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    drive(source, feed, 3, first=4)
    drive(target, target_feed, 3, first=4)  # the fake graph replays what was captured before the load
    assert_same_weights(source, target)


def beton_or_skip():
    """resnetdist.data.beton (conversion) and .ffcv_loader with FFCV importable, else skip."""
    beton = pytest.importorskip("resnetdist.data.beton")
    try:
        beton.require_ffcv()
    except RuntimeError:
        pytest.skip("FFCV not installed")
    from resnetdist.data import ffcv_loader

    return beton, ffcv_loader


# ----- defect 2: FFCV's loader thread sets the rank's device ---------------------------------------


@pytest.mark.slow  # FFCV's import and numba compilation: ~15 s here
@pytest.mark.timeout(240)
def test_ffcv_loader_thread_binds_the_loaders_device(tmp_path, tiny_data, monkeypatch):
    beton, ffcv_loader = beton_or_skip()
    import threading

    from resnetdist.data.cifar import load_cifar10

    betons = tmp_path / "beton"
    beton.prepare_betons(load_cifar10(tiny_data).folder, betons)
    calls = []
    monkeypatch.setattr(ffcv_loader, "bind_thread", lambda device: calls.append((device, threading.current_thread())))
    loader = ffcv_loader.FfcvEvalLoader(betons / "test.beton", None, 100, 0, 1, CPU, 1)
    assert sum(len(y) for _, y in loader) == 200
    assert [c[0] for c in calls] == [CPU] and calls[0][1] is not threading.main_thread()


# ----- defect 5: evaluation in fp32 whatever the training precision --------------------------------


def test_evaluation_runs_in_fp32_even_inside_autocast(tiny_data):
    step, _ = build(tiny_data)
    *_, loaders = parts(tiny_data)
    dtypes = []
    handle = step.model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        error_rates(step.model, loaders.evals, step.mean, step.memory_format)
    handle.remove()
    assert dtypes and set(dtypes) == {torch.float32}


# ----- defect 3: the bench baseline at its best ----------------------------------------------------


def test_bench_baseline_turns_cudnn_benchmark_on_and_records_its_settings(monkeypatch):
    from resnetdist.tools.bench import baseline_settings

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    settings = baseline_settings(torch.device("cuda"), 8)  # only flags: runs without a GPU
    assert torch.backends.cudnn.benchmark is True
    assert settings["cudnn_benchmark"] is True and settings["pin_memory"] and settings["non_blocking"]
    assert settings["dataloader_workers"] == 8 and settings["precision"] == "fp32"


# ----- defect 6: NCCL's async error handling set where it takes effect -----------------------------


def test_nccl_async_error_handling_is_decided_once_in_the_worker_for_every_launcher(monkeypatch):
    """torchrun's agent overwrites the launcher's value in its workers: the worker decides it,
    just before it creates the process group, and no launcher sets it."""
    from resnetdist import dist

    seen = {}
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # what torchrun may hand a worker
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda **kw: seen.update(
        env=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")))
    dist.setup("cpu", 60)
    assert seen["env"] == dist.NCCL_ASYNC_ERROR_HANDLING == "1"
    launchers = ["resnetdist/launcher.py", "resnetdist/cli.py", "resnetdist/training/worker.py", "launch/common.sh",
                 "launch/slurm.sbatch", "launch/docker-run.sh", "launch/torchrun-single-node.sh",
                 "launch/torchrun-multi-node.sh", "docker/Dockerfile"]
    for path in launchers:
        text = (REPO / path).read_text() if (REPO / path).exists() else ""
        assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=" not in text and "ASYNC_ERROR_HANDLING\"," not in text, path


# ----- defect 4: every rank evaluates rank 0's model -----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_evaluate_rank0s_bn_statistics(tiny_data):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--tee=3", str(REPO / "tests" / "_bn_worker.py"), str(tiny_data)],
                          cwd=REPO, env=cli_env(PYTHONPATH=str(REPO)),  # a script's own folder is sys.path[0]
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line[line.index("{"):]) for line in proc.stdout.splitlines() if '"same_as_rank0"' in line]
    assert len(results) == 2 and all(r["same_as_rank0"] for r in results)
    assert results[0]["test_error"] == results[1]["test_error"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_rank_run_and_eval_of_its_model_agree(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_torchrun(2, [*TINY, "--iters", "30", "--set", "train.eval_every=30", "--data-dir", str(tiny_data),
                            "--out", str(out), "--json"], timeout=300)
    ranks = [json.loads(line[line.index("{"):]) for line in proc.stdout.splitlines() if '{"rank"' in line]
    summary = json.loads((out / "summary.json").read_text())
    assert len(ranks) == 2 and ranks[0]["test_error"] == ranks[1]["test_error"] == summary["test_error"]
    evaluated = json.loads(cli_in_process(["eval", str(out / "model.pt"), "--device", "cpu", "--json"]).stdout)
    assert evaluated["test_error"] == summary["test_error"]


# ----- CUDA (skipped here) ---------------------------------------------------------------------------


def cuda_parts(tiny_data):
    cfg = load_config(flags={"model": {"n": 1}, "data": {"dir": str(tiny_data)}, "optim": {"batch_size": B},
                             "train": {"device": "cuda", "precision": "bf16"}, "log": {"wandb_mode": "disabled"}})
    ctx = DistContext(0, 0, 1, torch.device("cuda", 0))
    data = load_data(cfg.data)
    model, optimizer = make_model(cfg, ctx)
    return cfg, ctx, data, model, optimizer


@cuda
@pytest.mark.cuda
@pytest.mark.timeout(600)
def test_cuda_graph_is_the_default_and_gathers_in_place_and_loads_in_place(tiny_data, copies):
    from resnetdist.training.trainer import build

    cfg, ctx, data, _, _ = cuda_parts(tiny_data)
    plan = resolve(cfg, 1)
    assert plan.choice == StepChoice("graph", "auto: CUDA with bf16", "auto"), plan
    trainer = build(cfg, ctx, data, plan=plan)
    step, feed, model, optimizer = trainer.step, trainer.feed, trainer.model, trainer.optimizer
    assert step.choice == StepChoice("graph", "auto: CUDA with bf16", "auto"), step.choice
    drive(step, feed, 5)
    assert copies == [False] * 5
    ptrs = [s["momentum_buffer"].data_ptr() for s in optimizer.state.values()]
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    step.load_state(state["model"], state["optimizer"], 5)
    assert ptrs == [s["momentum_buffer"].data_ptr() for s in optimizer.state.values()]


@cuda
@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_cuda_ffcv_thread_uses_the_loaders_device(tmp_path, tiny_data, monkeypatch):
    beton, ffcv_loader = beton_or_skip()
    from resnetdist.data.cifar import load_cifar10

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    beton.prepare_betons(load_cifar10(tiny_data).folder, tmp_path)
    real, seen = ffcv_loader.bind_thread, []
    monkeypatch.setattr(ffcv_loader, "bind_thread", lambda d: (real(d), seen.append(torch.cuda.current_device())))
    loader = ffcv_loader.FfcvEvalLoader(tmp_path / "test.beton", None, 100, 0, 1, device, 1)
    assert sum(len(y) for _, y in loader) == 200 and seen == [device.index]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.cuda
@pytest.mark.timeout(600)
def test_cuda_two_rank_ddp_graph_doctor():
    proc = run_torchrun(2, ["--device", "cuda", "--json", "--skip", "compile,speed"], command="doctor",
                        timeout=500, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
