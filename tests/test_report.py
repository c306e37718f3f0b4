"""`resnetdist report`, `export` and `reproduce`, end to end.

report: hand-written run folders (several seeds) -> the table beside the paper's numbers and
PNGs whose pixels are checked. export: a real tiny run's model.pt -> safetensors (loaded with
safetensors itself) and ONNX (run in onnxruntime). reproduce: two tiny nets on the CPU,
interrupted by killing its process group, then resumed to the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetdist import checkpoint
from resnetdist.config import from_dict
from resnetdist.models import build_model

from .conftest import REPO, TINY, cli, cli_env, cli_in_process, run_cli
from .helpers import check_png, png_size, read_jsonl, write_fixture_run

# ----- report on hand-written runs ---------------------------------------------------------------


@pytest.fixture()
def fixture_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, err in enumerate((8.5, 8.9, 8.7)):
        write_fixture_run(root, "resnet20", 20, False, seed, err)
    for seed, err in enumerate((10.0, 10.4)):
        write_fixture_run(root, "plain20", 20, True, seed, err)
    write_fixture_run(root, "resnet56", 56, False, 0, 7.1)
    write_fixture_run(root, "plain56", 56, True, 0, 15.0)
    write_fixture_run(root, "resnet56", 56, False, 1, 0.0, finished=False)  # still running
    (root / "notes").mkdir()  # not a run: ignored
    return root


def has_colour(rgb: np.ndarray, hex_colour: str, tol: int = 30, min_pixels: int = 50) -> bool:
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).max(axis=2) <= tol).sum()) >= min_pixels


@pytest.mark.timeout(120)
def test_report_table_and_figures(fixture_runs, tmp_path):
    out = tmp_path / "report"
    proc = cli(["report", fixture_runs, "--out", out])
    assert "from 8 run(s)" in proc.stdout
    md = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    # mean +- std over seeds, number of runs, best, paper and seed-repo figures side by side
    r20 = [c.strip() for c in rows["ResNet-20"].split("|")[1:-1]]
    assert r20[:5] == ["ResNet-20", "64,000", "3", "8.70 ± 0.20", "8.50"] and r20[6:] == ["8.75", "8.74"]
    p20 = [c.strip() for c in rows["Plain-20"].split("|")[1:-1]]
    assert p20[2:4] == ["2", "10.20 ± 0.28"] and p20[6:] == ["~9 †", "10.08"]
    r56 = [c.strip() for c in rows["ResNet-56"].split("|")[1:-1]]
    assert r56[2:4] == ["1 (+1 unfinished)", "7.10"] and r56[6:] == ["6.97", "7.41"]
    p56 = [c.strip() for c in rows["Plain-56"].split("|")[1:-1]]
    assert p56[3] == "15.00" and p56[6:] == ["~13 †", "15.39"]
    # the published table is there in full, with the figures read off the plot marked
    for figure in ("7.51", "7.17", "6.43 (best of 5; 6.61 ± 0.16 mean)", "7.93", "11.15", "14.12", ">60 †"):
        assert figure in md, figure
    assert "read off" in md and "Figure 6" in md
    assert "unfinished" in md and "figure6.png" in md

    # Figure 6 layout: two panels, one colour per depth, drawn
    rgb = check_png(out / "figure6.png", (1000, 400))
    assert has_colour(rgb, "#e6a700") and has_colour(rgb, "#d62728"), "depth 20 / 56 curves missing"
    left, right = rgb[:, : rgb.shape[1] // 2], rgb[:, rgb.shape[1] // 2 :]
    for half in (left, right):  # plain nets left, ResNets right: both panels hold both depths
        assert has_colour(half, "#e6a700") and has_colour(half, "#d62728")
    curves = sorted(p.name for p in (out / "curves").iterdir())
    assert len(curves) == 8
    check_png(out / "curves" / "resnet20-s0.png", (500, 300))


@pytest.mark.timeout(60)
def test_report_default_out_and_single_run(fixture_runs):
    run = fixture_runs / "resnet56-s0"
    cli(["report", run])
    md = (run / "report.md").read_text()
    assert "| ResNet-56 | 64,000 | 1 | 7.10 |" in md
    png_size(run / "figure6.png")


@pytest.mark.timeout(60)
def test_report_errors_name_the_folder(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    proc = cli(["report", empty], code=2)
    assert str(empty) in proc.stderr and "no runs" in proc.stderr
    run = tmp_path / "resnet20-s0"
    run.mkdir()
    (run / "config.toml").write_text("[model]\nn = 3\n")
    (run / "metrics.jsonl").write_text("")
    proc = cli(["report", run], code=2)
    assert str(run) in proc.stderr and "no metrics" in proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    # inside a parent folder, such a run is skipped and noted; the others are reported
    write_fixture_run(tmp_path, "resnet8", 8, False, 0, 30.0, iters=100)
    proc = cli(["report", tmp_path, "--out", tmp_path / "rep"])
    assert "skipped" in proc.stderr and str(run) in proc.stderr
    assert "| ResNet-8 | 100 | 1 | 30.00 |" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.timeout(60)
def test_report_prints_the_table_and_counts_a_repeated_seed_once(tmp_path):
    """Three folders holding seed 0 of ResNet-20 are one seed, not three: the table counts it
    once (no 0.00 spread), names the repeat in one line, and prints itself to the terminal."""
    root = tmp_path / "runs"
    for copy, err in (("a", 8.0), ("b", 9.0), ("c", 10.0)):
        write_fixture_run(root / copy, "resnet20", 20, False, 0, err)
    write_fixture_run(root / "a", "resnet20", 20, False, 1, 8.4)
    proc = cli(["report", root / "a", root / "b", root / "c", "--out", tmp_path / "rep"])
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| ResNet-20 "))
    assert [c.strip() for c in row.split("|")[1:-1]][:5] == ["ResNet-20", "64,000", "2", "8.20 ± 0.28", "8.00"]
    assert "| net | iterations | seeds |" in proc.stdout
    notes = [line for line in proc.stderr.splitlines() if "seed 0" in line]
    assert len(notes) == 1 and "3 runs" in notes[0] and str(root / "b" / "resnet20-s0") in notes[0], proc.stderr
    assert "seed 1" not in proc.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert row in md and "seed 0 is in 3 runs" in md

    from resnetdist.suite.discover import load_runs
    from resnetdist.suite.figures import figure6_axes

    runs, _ = load_runs([root / "a", root / "b", root / "c"])
    fig, axes, _ = figure6_axes(runs)
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert "ResNet-20 (mean of 2 seeds)" in labels, labels


def assert_axes_hold_every_point(axes):
    for ax in axes:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for line in ax.lines:
            xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
            if len(xs):
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, \
                    (line.get_label(), (x0, x1, y0, y1), xs, ys)


@pytest.mark.timeout(60)
def test_figure6_axes_hold_every_point(fixture_runs):
    """The first evaluations (near 46% error here) are inside the axes, not cut off at the top."""
    from resnetdist.suite.discover import load_runs
    from resnetdist.suite.figures import figure6_axes

    runs, _ = load_runs([fixture_runs])
    _, axes, drawn = figure6_axes(runs)
    assert max(max(y) for y in drawn.ys) > 40  # the paper-like 0-20% axis (or a cut one) would clip these
    assert sum(len(ax.lines) for ax in axes) >= 8
    assert_axes_hold_every_point(axes)


@pytest.mark.timeout(60)
def test_short_suite_draws_every_point_and_warns(tmp_path):
    """eval_every > iters: one evaluation per run. Each curve is a visible dot, and one line
    says the curves have few points."""
    root = tmp_path / "runs"
    for model, depth, plain in (("resnet20", 20, False), ("plain20", 20, True)):
        write_fixture_run(root, model, depth, plain, 0, 80.0, iters=100, points=1)
    proc = cli(["report", root])
    warnings = [line for line in proc.stderr.splitlines() if "fewer than" in line]
    assert len(warnings) == 1 and "figure6.png" in warnings[0], proc.stderr
    assert "eval_every" in warnings[0]

    from resnetdist.suite.discover import load_runs
    from resnetdist.suite.figures import figure6_axes

    _, axes, _ = figure6_axes(load_runs([root])[0])
    curves = [line for ax in axes for line in ax.lines]
    assert len(curves) == 4 and all(len(c.get_xdata()) == 1 for c in curves)
    assert all(c.get_marker() not in (None, "None", "", " ") for c in curves)
    assert_axes_hold_every_point(axes)
    rgb = check_png(root / "figure6.png", (1000, 400))
    assert has_colour(rgb, "#e6a700", min_pixels=20), "the one-point curves are not drawn"


@pytest.mark.timeout(60)
def test_lr_panel_steps_at_the_runs_own_milestones(tmp_path):
    """The run's lr fell at 150 and 225 (its config.toml), scaled as its machine resolved
    (resolved.toml: 2 ranks, batch per rank); evaluations every 100 iterations must not move the
    drawn steps to 200 and 300. Without resolved.toml the logged lrs are drawn."""
    from resnetdist.suite.discover import load_run
    from resnetdist.suite.figures import lr_steps

    run = write_fixture_run(tmp_path, "resnet20", 20, False, 0, 20.0, iters=300, points=3)
    (run / "config.toml").write_text(
        "[model]\nn = 3\n\n[optim]\niters = 300\nmilestones = [150, 225]\nwarmup_iters = 0\n\n[train]\nseed = 0\n\n[dist]\nscale_warmup_iters = 0\n")
    logged = [(int(r["iter"]), float(r["lr"])) for r in load_run(run).records if r.get("lr")]
    assert lr_steps(load_run(run)) == logged and logged
    (run / "resolved.toml").write_text("[resolved]\nworld_size = 2\nlr_scale = 2.0\n")
    assert lr_steps(load_run(run)) == [(0, 0.2), (150, pytest.approx(0.02)), (225, pytest.approx(0.002)),
                                       (300, pytest.approx(0.002))]
    cli(["report", run])
    check_png(run / "curves" / "resnet20-s0.png", (500, 300))


# ----- export ------------------------------------------------------------------------------------


def load_reference(model_pt: Path):
    state = checkpoint.load(model_pt)
    cfg = from_dict(state["config"], str(model_pt))
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.eval(), state


def sample_images(tiny_data: Path, n: int) -> np.ndarray:
    from resnetdist.data.cifar import FOLDER, read_batch_file

    return read_batch_file(tiny_data / FOLDER / "test_batch.bin").images[:n]


@pytest.mark.timeout(120)
def test_export_safetensors(tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "resnet8.safetensors"
    proc = cli(["export", tiny_model, "--format", "safetensors", "--out", out, "--json"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == str(out) and result["model"] == "resnet8"
    model, state = load_reference(tiny_model)
    loaded = load_file(str(out))  # the run's own model.safetensors format: the mean, and the net under net.
    assert loaded.keys() == {"mean"} | {f"net.{k}" for k in state["model"]}
    for k, v in state["model"].items():
        assert torch.equal(loaded[f"net.{k}"], v), k
    assert torch.equal(loaded["mean"], state["mean"])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == state["config"]
    assert meta["model"] == "resnet8" and meta["depth"] == "8" and meta["plain"] == "false"
    assert meta["mean_file"] == "resnet8.mean.npy"
    mean = np.load(tmp_path / "resnet8.mean.npy")
    assert mean.shape == (3, 32, 32) and mean.dtype == np.float32
    np.testing.assert_array_equal(mean, state["mean"].numpy())
    # a fresh net with these weights gives the same logits
    fresh = build_model(from_dict(json.loads(meta["config"]), "meta").model).eval()
    fresh.load_state_dict({k.removeprefix("net."): v for k, v in loaded.items() if k != "mean"})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.fixture(scope="module")
def onnx_export(tiny_model) -> dict:
    """`resnetdist export model.pt --format onnx`, in a subprocess as a user runs it."""
    proc = run_cli(["export", str(tiny_model), "--format", "onnx", "--json"])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_export_onnx_runs_in_onnxruntime(tiny_model, tiny_data, onnx_export):
    import onnx
    import onnxruntime as ort

    out = tiny_model.with_suffix(".onnx")
    assert onnx_export["out"] == str(out) and onnx_export["max_abs_diff"] <= 1e-4
    assert not out.with_name(out.name + ".data").exists(), "weights must be inside the .onnx file"
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model"] == "resnet8" and json.loads(props["config"])["model"]["n"] == 1

    # preprocess real images as documented, run both, compare
    model, state = load_reference(tiny_model)
    mean = np.load(tiny_model.with_name("model.mean.npy"))
    images = sample_images(tiny_data, 10)
    x = images.astype(np.float32) / 255.0 - mean
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)
    for batch in (x[:1], x):  # dynamic batch
        got = session.run(None, {"input": batch})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(batch)).numpy()
        assert got.shape == (len(batch), 10)
        assert np.abs(got - want).max() <= 1e-4
    # the same preprocessing as the trainer's evaluation
    from resnetdist.data.augment import normalize

    with torch.no_grad():
        ref = model(normalize(torch.from_numpy(images), state["mean"])).numpy()
    assert np.abs(session.run(None, {"input": x})[0] - ref).max() <= 1e-4


@pytest.mark.timeout(60)
def test_export_check_fails_loudly(tiny_model, onnx_export, tmp_path):
    from resnetdist.tools.export import ExportError, check_onnx

    model, _ = load_reference(tiny_model)
    assert check_onnx(model, Path(onnx_export["out"])) <= 1e-4
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # the PyTorch side no longer matches the file
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_onnx(model, Path(onnx_export["out"]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = cli(["export", bad, "--format", "onnx"], code=2)
    assert str(bad) in proc.stderr and "not a readable checkpoint" in proc.stderr
    proc = cli(["export", tiny_model, "--format", "tflite"], code=2)
    assert "safetensors, onnx" in proc.stderr


# ----- reproduce ---------------------------------------------------------------------------------

REPRO = ["reproduce", "--depths", "8,14", "--resnet", "--seeds", "1", "--iters", "12", "--device", "cpu",
         "--set", "optim.batch_size=32", "--set", "data.eval_batch=100", "--set", "train.eval_every=6",
         "--set", "train.checkpoint_every=3", "--set", "log.log_every=3", "--set", "log.tensorboard=false",
         "--set", "log.wandb_mode=disabled"]


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(420)
def test_reproduce_interrupted_then_resumed(tmp_path, tiny_data):
    out = tmp_path / "suite"
    args = [sys.executable, "-m", "resnetdist", *REPRO, "--data-dir", str(tiny_data), "--out", str(out)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    # longest first: resnet14 runs before resnet8
    first_done = out / "resnet14-s0" / "summary.json"
    second = out / "resnet8-s0"
    try:
        deadline = time.monotonic() + 300
        # kill the whole process group once the first run finished and the second has a checkpoint
        while not (first_done.exists() and any(second.glob("ckpt_*.pt"))):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "reproduce made no progress"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (second / "summary.json").exists(), "the second run finished before the kill"
    assert not (out / "report.md").exists()

    again = run_cli([*REPRO, "--data-dir", str(tiny_data), "--out", str(out)], timeout=300)
    text = again.stdout
    assert "skip  resnet14-s0: already finished" in text
    assert "start resnet8-s0" in text and "(resuming)" in text and "done  resnet8-s0" in text
    assert "resuming from" in (second / "train.log").read_text()
    # in a pipe: each evaluation as a line, read from the run folders, and no bar
    assert "resnet8-s0  eval at 12/12  train err" in text and "\x1b" not in text, text
    assert [r["iter"] for r in read_jsonl(second / "progress.jsonl")] == [3, 6, 9, 12]  # each log point once
    assert f"figures in {out}: figure6.png, figure7.png, curves/resnet14-s0.png, curves/resnet8-s0.png" in text
    for name in ("resnet8-s0", "resnet14-s0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["iterations"] == 12
    md = (out / "report.md").read_text()
    assert "| ResNet-8 | 12 | 1 |" in md and "| ResNet-14 | 12 | 1 |" in md
    check_png(out / "figure6.png", (1000, 400))
    assert {p.name for p in (out / "curves").iterdir()} == {"resnet8-s0.png", "resnet14-s0.png"}

    # a third time: everything is finished, nothing runs
    third = cli([*REPRO, "--data-dir", tiny_data, "--out", out])
    assert third.stdout.count("already finished") == 2 and "] start" not in third.stdout


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(180)
def test_reproduce_reports_failed_runs_and_exits_nonzero(tmp_path, tiny_data):
    out = tmp_path / "suite"
    # resnet8 (first in line) is told to resume a folder holding another experiment: train refuses
    write_fixture_run(out, "resnet8", 8, False, 0, 50.0, iters=999, finished=False)
    proc = cli([*REPRO, "--depths", "8", "--plain", "--data-dir", tiny_data, "--out", out], code=1)
    assert "FAIL  resnet8-s0: exit code 2" in proc.stdout
    assert "done  plain8-s0" in proc.stdout, "a failed run stopped the others"
    assert "1 of 2 runs failed" in proc.stdout
    assert f"resnet8-s0: exit code 2; log {out / 'resnet8-s0' / 'train.log'}" in proc.stdout
    assert "different configuration" in (out / "resnet8-s0" / "train.log").read_text()
    assert "| Plain-8 | 12 | 1 |" in (out / "report.md").read_text()  # written from what finished


@pytest.mark.timeout(30)
def test_reproduce_rejects_bad_depths(tmp_path):
    proc = cli(["reproduce", "--depths", "8,21", "--out", tmp_path], code=2)
    assert "21 is not 6n+2" in proc.stderr


# ----- the honest report -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_report_on_short_standin_runs_says_what_they_are(tmp_path):
    """Runs of 200 iterations whose summary says nothing about the data (the stand-in): the
    terminal and report.md say the data is not verified CIFAR-10 and the runs are 200 of the
    paper's 64,000 iterations; their table has no paper column; names agree with the legend."""
    root = tmp_path / "runs"
    for model, depth, plain in (("resnet8", 8, False), ("plain8", 8, True)):
        write_fixture_run(root, model, depth, plain, 0, 60.0, iters=200, points=4, data_identity=None)
    proc = cli(["report", root, "--out", tmp_path / "rep"])
    md = (tmp_path / "rep" / "report.md").read_text()
    for text in (proc.stdout, md):
        assert "not verified CIFAR-10" in text and "200 of the paper's 64,000" in text, text
    assert "on CIFAR-10: reproduction" not in md.splitlines()[0]
    assert "## Final test error: runs not comparable with the paper" in md
    assert "(comparable with the paper)" not in md and "| paper (Table 6) |" not in md
    row = next(line for line in md.splitlines() if line.startswith("| Plain-8 |"))
    assert row.endswith("| data that is not verified CIFAR-10 (unknown origin); 200 of the paper's 64,000 iterations |"), row
    assert "| Highway | 19 | 2.3M | 7.54 (7.72 ± 0.16) |" in md and "| ResNet | 1202 | 19.4M | 7.93 |" in md
    assert "third panel (ResNet-110 and ResNet-1202) is left out" in md

    from resnetdist.suite.discover import load_runs
    from resnetdist.suite.figures import figure6_axes

    _, axes, _ = figure6_axes(load_runs([root])[0])
    assert len(axes) == 2 and [t.get_text() for t in axes[0].get_legend().get_texts()][0] == "Plain-8"


@pytest.mark.timeout(60)
def test_each_length_of_a_net_is_drawn_and_resnet110_gets_the_third_panel(tmp_path):
    from resnetdist.suite.discover import load_runs
    from resnetdist.suite.figures import figure6_axes

    root = tmp_path / "runs"
    write_fixture_run(root / "short", "resnet8", 8, False, 0, 70.0, iters=60, points=3)
    write_fixture_run(root / "long", "resnet8", 8, False, 0, 50.0, iters=200, points=4)
    write_fixture_run(root / "deep", "resnet110", 110, False, 0, 6.5)
    _, axes, drawn = figure6_axes(load_runs([root / "short", root / "long", root / "deep"])[0])
    assert [ax.get_title() for ax in axes] == ["plain networks", "ResNets", "ResNet-110 and ResNet-1202"]
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert {"ResNet-8, 60 it.", "ResNet-8, 200 it.", "ResNet-110"} <= set(labels), labels
    assert [t.get_text() for t in axes[2].get_legend().get_texts()][0] == "ResNet-110"
    colours = {line.get_color() for line in axes[1].lines}
    assert len(colours) == 3  # the two lengths of ResNet-8 and ResNet-110 apart
