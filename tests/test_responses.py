"""Figure 7 (layer responses) and the honest report.

Layer responses: two briefly trained tiny runs (ResNet-8 and Plain-8) -> `report` writes
figure7.png and layer_responses.json, whose stds equal an independent computation (forward
hooks on the BN layers that follow the 3x3 convs, every output kept, torch's std); the cache
is read back and refreshed when model.pt changes; bad model.pt files. The honest report:
hand-written run folders (short, on unverified data, several lengths, ResNet-110) -> what
the terminal, report.md and Figure 6 say.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from resnetdist import checkpoint
from resnetdist.config import ModelConfig, from_dict
from resnetdist.models import build_model

from .conftest import TINY, cli_in_process


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_data) -> Path:
    """ResNet-8 and Plain-8, 8 iterations each on the tiny data set, in one folder."""
    root = tmp_path_factory.mktemp("responses") / "runs"
    for name, plain in (("resnet8-s0", "false"), ("plain8-s0", "true")):
        cli_in_process(["train", *TINY, "--iters", "8", "--data-dir", str(tiny_data), "--out", str(root / name),
                        "--set", "train.eval_every=8", "--set", f"model.plain={plain}"])
    return root


def hooked_stds(model_pt: Path) -> list[float]:
    """The independent computation: forward hooks on every BN that follows a 3x3 conv (found
    from the modules' names: conv -> bn, convK -> bnK), all outputs over the test set kept and
    concatenated, torch's std over all values."""
    from resnetdist.data.augment import normalize
    from resnetdist.data.cifar import load_cifar10

    state = torch.load(model_pt, weights_only=True)
    cfg = from_dict(state["config"], str(model_pt))
    model = build_model(cfg.model).eval()
    model.load_state_dict(state["model"])
    modules = dict(model.named_modules())
    bns = [name.replace("conv", "bn") for name, m in modules.items()
           if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in bns}
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach().clone()))
             for name in bns]
    images = torch.from_numpy(load_cifar10(Path(cfg.data.dir)).test.images)
    with torch.no_grad():
        model(normalize(images, state["mean"]))
    for h in hooks:
        h.remove()
    return [torch.cat(outputs[name]).double().std(unbiased=False).item() for name in bns]


def resnet8_stds(out: Path) -> list[float]:
    return next(r["stds"] for r in json.loads((out / "layer_responses.json").read_text())["runs"]
                if r["name"] == "resnet8-s0")


@pytest.mark.slow  # trains two tiny runs, writes three reports: ~6 s alone, ~70 s on a busy 2-core machine
@pytest.mark.timeout(300)
def test_figure7_stds_equal_forward_hooks_and_are_cached(trained_runs, tmp_path):
    out = tmp_path / "report"
    result = cli_in_process(["report", str(trained_runs), "--out", str(out)])
    assert (out / "figure7.png").stat().st_size > 10_000, result.stdout
    data = json.loads((out / "layer_responses.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"resnet8-s0", "plain8-s0"}
    assert runs["plain8-s0"]["net"] == "Plain-8" and runs["resnet8-s0"]["seed"] == 0
    for name, run in runs.items():
        expected = hooked_stds(trained_runs / name / "model.pt")
        assert len(run["stds"]) == len(expected) == 7  # the first conv, then 3 blocks x 2
        assert run["stds"] == pytest.approx(expected, rel=1e-3)
    assert [n["net"] for n in data["nets"]] == ["Plain-8", "ResNet-8"]  # plain first, as in the paper
    md = (out / "report.md").read_text()
    assert "![std of each layer's response](figure7.png)" in md and "ResNet-8, 8 iterations (1 run): mean std" in md

    # the second report reads the cache (planted values show it), until model.pt changes
    cache = trained_runs / "resnet8-s0" / "layer_responses.cache.json"
    planted = json.loads(cache.read_text()) | {"stds": [1.0] * 7}
    cache.write_text(json.dumps(planted))
    cli_in_process(["report", str(trained_runs), "--out", str(out)])
    assert resnet8_stds(out) == [1.0] * 7
    state = torch.load(trained_runs / "resnet8-s0" / "model.pt", weights_only=True)
    state["model"]["bn.bias"] += 0.5  # new weights: the cached values no longer hold
    checkpoint.atomic_save(state, trained_runs / "resnet8-s0" / "model.pt")
    cli_in_process(["report", str(trained_runs), "--out", str(out)])
    stds = resnet8_stds(out)
    assert stds == pytest.approx(hooked_stds(trained_runs / "resnet8-s0" / "model.pt"), rel=1e-3) and stds != [1.0] * 7


@pytest.mark.slow  # the same two tiny runs
@pytest.mark.timeout(300)
def test_figure7_bad_model_files(trained_runs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)
    (runs / "plain8-s0" / "model.pt").unlink()  # unfinished: left out of Figure 7, named
    (runs / "resnet8-s0" / "layer_responses.cache.json").unlink(missing_ok=True)
    result = cli_in_process(["report", str(runs), "--out", str(tmp_path / "one")])
    lines = [line for line in result.stderr.splitlines() if "Figure 7" in line]
    assert lines == [f"skipped: {runs / 'plain8-s0'}: no model.pt (unfinished), left out of Figure 7"], result.stderr
    assert [r["name"] for r in json.loads((tmp_path / "one" / "layer_responses.json").read_text())["runs"]] == ["resnet8-s0"]

    # a model.pt that is not a resnetdist model: one line, exit 2, nothing written
    checkpoint.atomic_save({"weights": torch.zeros(3)}, runs / "resnet8-s0" / "model.pt")
    result = cli_in_process(["report", str(runs), "--out", str(tmp_path / "two")], check=False)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "resnet8-s0/model.pt" in result.stderr
    assert "not a resnetdist model" in result.stderr
    assert not (tmp_path / "two").exists()


def test_projection_shortcuts_are_not_3x3_layers():
    """Option B: the 1x1 projection convs (and their BN) are not among the responses."""
    from resnetdist.suite.responses import response_maps

    model = build_model(ModelConfig(n=2, shortcut="B")).eval()
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2
    with torch.no_grad():
        maps = list(response_maps(model, torch.randn(2, 3, 32, 32)))
    assert len(maps) == 1 + 6 * 2
    assert [m.shape[1] for m in maps] == [16] * 5 + [32] * 4 + [64] * 4
