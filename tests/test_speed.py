"""The fast paths compute the same thing as the eager step; `bench` runs and writes its JSON.
CUDA-graph tests need a GPU and are skipped without one."""

import json

import pytest
import torch

from resnetdist import checkpoint
from resnetdist.bench import Setting, make_trainer
from resnetdist.data.augment import draw_params
from resnetdist.worker import load_data
from resnetdist.config import load_config

from .conftest import run_cli

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run_steps(trainer, count: int, first: int = 0) -> None:
    step = trainer.step_fn or trainer.build_step()
    trainer.step_fn = step
    batches = trainer.train_loader.batches(first)
    for i in range(first, first + count):
        images, labels = next(batches)
        step(images, labels, draw_params(0, i, trainer.global_batch, 0, 1))


def tiny_trainer(tiny_data, mode: str, device: str = "cpu", precision: str = "fp32"):
    data = load_data(load_config(flags={"data": {"dir": str(tiny_data)}}))
    return make_trainer(Setting("gpu", mode, precision), data, 1, torch.device(device), None)


def assert_weights_close(a, b, rtol, atol):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


@pytest.mark.timeout(600)
def test_compiled_step_matches_eager_on_cpu(tiny_data):
    """One step agrees to float32 reordering noise; over more steps SGD at lr 0.1 amplifies that
    noise, so the losses are compared there instead of the weights."""
    eager = tiny_trainer(tiny_data, "eager")
    compiled = tiny_trainer(tiny_data, "compile")
    run_steps(eager, 1)
    run_steps(compiled, 1)
    assert_weights_close(eager, compiled, rtol=1e-4, atol=1e-4)
    run_steps(eager, 5, first=1)
    run_steps(compiled, 5, first=1)
    assert torch.allclose(eager.stats, compiled.stats, rtol=1e-3)  # loss sum, errors, count
    assert int(eager.it) == int(compiled.it) == 6


@pytest.mark.timeout(300)
def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(["bench", "-n", "1", "--iters", "3", "--warmup", "1", "--modes", "eager,graph",
                    "--precisions", "fp32", "--loaders", "gpu", "--workers", "1", "--out", str(out)],
                   timeout=280)
    report = json.loads(out.read_text())
    assert report["kind"] == "step" and report["device"] and report["torch"] == torch.__version__
    labels = [r["setting"] for r in report["results"]]
    assert labels[0].startswith("baseline") and "gpu loader, eager, fp32" in labels
    for r in report["results"]:
        assert r["ms_per_iter"] > 0 and r["projected_64k_s"] == pytest.approx(r["ms_per_iter"] * 64)
    if not torch.cuda.is_available():
        assert any("CUDA graphs need a GPU" in s for s in report["skipped"])
    assert "| baseline" in proc.stdout

    loader_out = tmp_path / "loader.json"
    run_cli(["bench", "loader", "--iters", "3", "--warmup", "1", "--loaders", "gpu", "--out", str(loader_out)])
    assert json.loads(loader_out.read_text())["results"][0]["images_per_second"] > 0


# ----- CUDA graphs (GPU only) -------------------------------------------------------------------


@cuda
@pytest.mark.timeout(600)
def test_graph_step_matches_eager_and_follows_the_lr_schedule(tiny_data):
    """Replays cross a milestone: the lr read inside the graph must change with no re-capture."""
    eager = tiny_trainer(tiny_data, "eager", "cuda", "fp32")
    graph = tiny_trainer(tiny_data, "graph", "cuda", "fp32")
    for t in (eager, graph):
        t.lrs.copy_(torch.tensor([0.1] * 5 + [0.01] * (len(t.lrs) - 5)))
        run_steps(t, 8)
    assert graph.lr.item() == pytest.approx(0.01)
    assert_weights_close(eager, graph, rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.timeout(600)
def test_graph_evaluation_between_replays_and_resume(tiny_data, tmp_path):
    trainer = tiny_trainer(tiny_data, "graph", "cuda", "bf16")
    run_steps(trainer, 5)
    before = trainer.evaluate()
    run_steps(trainer, 5, first=5)  # replays after an evaluation keep training in train mode
    assert trainer.model.training
    state = trainer.state_dict(10)
    checkpoint.atomic_save(state, tmp_path / "c.pt")
    resumed = tiny_trainer(tiny_data, "graph", "cuda", "bf16")
    resumed.load_state_dict(checkpoint.load(tmp_path / "c.pt"))
    assert resumed.evaluate() == trainer.evaluate()
    assert before["test_error"] >= 0


@cuda
@pytest.mark.timeout(900)
def test_graph_run_end_to_end(tmp_path, tiny_data):
    out = tmp_path / "run"
    run_cli(["train", "-n", "1", "--iters", "60", "--device", "cuda", "--data-dir", str(tiny_data), "--out", str(out),
             "--set", "optim.batch_size=32", "--set", "train.cuda_graph=true", "--set", "train.eval_every=30",
             "--set", "log.wandb_mode=disabled"])
    assert json.loads((out / "summary.json").read_text())["test_error"] < 60
