"""The training step in-process: the fast paths compute what the eager step computes, the
device-side counters and sums work, and `bench` runs and writes its JSON. CUDA-graph tests need
a GPU and are skipped without one."""

import json

import pytest
import torch

from resnetdist.tools.doctor import Trial

from .conftest import run_cli

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# Trial (tools/doctor.py): a trainer's step on the synthetic set, batch 32; `run(count, first)`
# feeds it iterations first .. first+count-1, as the training loop does.


def assert_weights_close(a: Trial, b: Trial, rtol, atol):
    for (name, x), y in zip(a.weights().items(), b.weights().values()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow  # torch.compile's cold compile: a minute or more on 2 cores
@pytest.mark.timeout(600)
def test_compiled_step_matches_eager_on_cpu(tiny_data):
    """One step agrees to float32 reordering noise; over more steps SGD at lr 0.1 amplifies that
    noise, so the losses are compared there instead of the weights."""
    eager = Trial(tiny_data, CPU, "eager")
    compiled = Trial(tiny_data, CPU, "compile")
    assert (eager.step.kind, compiled.step.kind) == ("eager", "compile")
    eager.run(1)
    compiled.run(1)
    assert_weights_close(eager, compiled, rtol=1e-4, atol=1e-4)
    eager.run(5, first=1)
    compiled.run(5, first=1)
    assert torch.allclose(eager.step.stats, compiled.step.stats, rtol=1e-3)  # loss sum, errors, count
    assert int(eager.step.it) == int(compiled.step.it) == 6


@pytest.mark.timeout(120)
def test_step_counts_on_the_device_and_drains_once(tiny_data):
    d = Trial(tiny_data, CPU, "eager")
    d.step.load_state(d.weights(), d.optimizer.state_dict(), 30)  # as a resume at iteration 30 does
    d.run(4, first=30)
    assert int(d.step.it) == 34
    stats, bad = d.step.drain()
    stats, bad = stats[0], bad[0]
    assert bad == -1 and stats[2] == 4 * 32 and 0 <= stats[1] <= 4 * 32 and stats[0] > 0
    assert d.step.drain()[0][0].tolist() == [0, 0, 0]  # drained: the sums start again


@pytest.mark.timeout(120)
def test_step_flags_the_first_non_finite_iteration(tiny_data):
    """A weight turned NaN after iteration 3 makes iteration 3's loss the first non-finite one
    (0-based, as the step counts): the later NaN losses do not move the flag."""
    d = Trial(tiny_data, CPU, "eager")
    d.run(3)
    with torch.no_grad():
        next(d.model.parameters()).fill_(float("nan"))
    d.run(3, first=3)
    _, bad = d.step.drain()
    assert bad[0] == 3


@pytest.mark.timeout(120)
def test_doctor_and_bench_step_what_train_trains(tiny_data, tiny_model):
    """doctor's and bench's trial is built by the run's own build: 6 of its iterations give the
    weights `train --iters 6` saved, bit for bit (tiny_model: the same net, batch and data)."""
    d = Trial(tiny_data, CPU, "eager", iters=6)
    d.run(6)
    saved = torch.load(tiny_model, map_location="cpu", weights_only=False)
    assert saved["iteration"] == 6
    for name, x in d.weights().items():
        assert torch.equal(x, saved["model"][name]), name


@pytest.mark.timeout(120)
def test_the_step_follows_the_lr_table_across_a_milestone(tiny_data):
    d = Trial(tiny_data, CPU, "eager", iters=10, milestones=[4])
    d.run(4)
    assert d.step.lr.item() == pytest.approx(0.1) and d.step.lr_of(4) == pytest.approx(0.1)
    d.run(1, first=4)
    assert d.step.lr.item() == pytest.approx(0.01) and d.step.lr_of(5) == pytest.approx(0.01)


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(300)
def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(["bench", "-n", "1", "--iters", "3", "--warmup", "1", "--modes", "eager,graph",
                    "--precisions", "fp32", "--loaders", "resident", "--workers", "1", "--out", str(out)],
                   timeout=280)
    report = json.loads(out.read_text())
    assert report["kind"] == "step" and report["device"] and report["torch"] == torch.__version__
    labels = [r["setting"] for r in report["results"]]
    assert labels[0].startswith("baseline") and "resident loader, eager, fp32" in labels
    for r in report["results"]:
        assert r["ms_per_iter"] > 0 and r["projected_64k_s"] == pytest.approx(r["ms_per_iter"] * 64)
    if not torch.cuda.is_available():
        assert any("CUDA graphs need a GPU" in s for s in report["skipped"])
    assert "| baseline" in proc.stdout

    loader_out = tmp_path / "loader.json"
    run_cli(["bench", "loader", "--iters", "3", "--warmup", "1", "--loaders", "resident", "--out", str(loader_out)])
    assert json.loads(loader_out.read_text())["results"][0]["images_per_second"] > 0


# ----- CUDA graphs (GPU only) -------------------------------------------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.timeout(600)
def test_graph_step_matches_eager_and_follows_the_lr_schedule(tiny_data):
    """Replays cross a milestone: the lr read inside the graph must change with no re-capture."""
    eager = Trial(tiny_data, CUDA, "eager", iters=64, milestones=[5])
    graph = Trial(tiny_data, CUDA, "graph", iters=64, milestones=[5])
    assert graph.step.kind == "graph"
    for d in (eager, graph):
        d.run(8)
    assert graph.step.lr.item() == pytest.approx(0.01)
    assert_weights_close(eager, graph, rtol=1e-3, atol=1e-3)


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """For the tests that compare two separately captured graphs: by default cuDNN may pick
    backward kernels that accumulate with atomics, so two runs of the same code differ in the
    last bits. With cudnn.deterministic, cudnn.benchmark (which make_model turns on) chooses
    among deterministic kernels only, and both graphs reuse the first one's choices (the
    benchmark cache is per process). cuBLAS and BN's reductions promise no bitwise equality
    across captures even so: the comparison allows the doctor's tolerance (CUDA_TOLERANCE)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


def assert_within_doctor_tolerance(a: dict, b: dict) -> None:
    from resnetdist.tools.doctor import CUDA_TOLERANCE

    for (name, x), y in zip(a.items(), b.values()):
        if x.is_floating_point():
            assert (x.double() - y.double()).abs().max().item() <= CUDA_TOLERANCE, name
        else:
            assert torch.equal(x, y), name  # counters (BN's num_batches_tracked)


@cuda
@pytest.mark.cuda
@pytest.mark.timeout(600)
def test_graph_evaluation_between_replays_and_resume(tiny_data, deterministic_cudnn):
    """An evaluation between replays changes nothing the graph trains with; weights and
    optimizer state loaded into another captured step (in place, as a resume loads them) give
    a graphed step that continues as the first: within the doctor's tolerance, under
    deterministic cuDNN kernels (the fixture)."""
    plain, evaluated = Trial(tiny_data, CUDA, "graph", "bf16"), Trial(tiny_data, CUDA, "graph", "bf16")
    for d in (plain, evaluated):
        d.run(5)
    evaluated.trainer.evaluate()
    evaluated.run(5, first=5)  # replays after an evaluation keep training in train mode
    plain.run(5, first=5)
    assert evaluated.model.training
    assert_within_doctor_tolerance(plain.weights(), evaluated.weights())
    state = {"model": evaluated.weights(), "optimizer": evaluated.optimizer.state_dict()}
    resumed = Trial(tiny_data, CUDA, "graph", "bf16")
    resumed.step.load_state(state["model"], state["optimizer"], 10)
    assert int(resumed.step.it) == 10
    assert resumed.trainer.evaluate() == evaluated.trainer.evaluate()  # the same weights, evaluated alike
    resumed.run(3, first=10)
    evaluated.run(3, first=10)
    assert_within_doctor_tolerance(resumed.weights(), evaluated.weights())


@cuda
@pytest.mark.cuda
@pytest.mark.timeout(900)
def test_graph_run_end_to_end(tmp_path, tiny_data):
    out = tmp_path / "run"
    # no step flag: the graph is the default on CUDA
    run_cli(["train", "-n", "1", "--iters", "60", "--device", "cuda", "--data-dir", str(tiny_data), "--out", str(out),
             "--set", "optim.batch_size=32", "--set", "train.eval_every=30", "--set", "log.wandb_mode=disabled"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_error"] < 60 and summary["step"] == "graph" and summary["step_reason"] == "auto: CUDA with bf16"
    assert 'step = "graph"' in (out / "config.toml").read_text()
    evaluated = json.loads(run_cli(["eval", str(out / "model.pt"), "--data-dir", str(tiny_data), "--json"]).stdout)
    assert evaluated["test_error"] == summary["test_error"]
