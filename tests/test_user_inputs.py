"""Every path a user can type into `eval`, `export`, `train --out` and `report`: a bad one is
answered in one line naming it, exit 2, no traceback, nothing written."""

from __future__ import annotations

import pickle

import pytest
import torch

from resnetdist import checkpoint
from resnetdist.config import load_config
from resnetdist.models import build_model
from resnetdist.training.trainer import final_weights

from .conftest import TINY, cli_in_process


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    """A real model.pt (untrained weights, as `train` writes it), without training."""
    cfg = load_config(None, {"model": {"n": 1}, "train": {"device": "cpu"}})
    path = tmp_path_factory.mktemp("run") / "model.pt"
    checkpoint.atomic_save(final_weights(build_model(cfg.model).state_dict(), cfg, 0, torch.zeros(3, 32, 32)), path)
    return path


def foreign_files(tmp, model_pt):
    """(path, words the message must hold) for each kind of file that is not a checkpoint."""
    other = tmp / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, other)  # someone else's checkpoint
    text = tmp / "notes.txt"
    text.write_text("hello\n")
    folder = tmp / "a_run"
    folder.mkdir()
    truncated = tmp / "model_cut.pt"
    truncated.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    cut_late = tmp / "model_cut_late.pt"  # torch.load's own error here was "negative seek value"
    cut_late.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size - 200])
    pickled = tmp / "pickled.pt"
    pickled.write_bytes(pickle.dumps(object()))
    mismatched = tmp / "mismatched.pt"  # a config that says n=2 beside weights of n=1
    state = checkpoint.load(model_pt)
    state["config"]["model"]["n"] = 2
    checkpoint.atomic_save(state, mismatched)
    return [(other, "not a resnetdist checkpoint"), (mismatched, "do not fit the net its config describes"), (text, "not a readable checkpoint"),
            (folder, "is a folder"), (tmp / "missing.pt", "no such file"),
            (truncated, "truncated (its zip archive lacks the end record"), (cut_late, "truncated"),
            (pickled, "not a readable checkpoint")]


def assert_one_line(result, path, words):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert str(path) in err and words in err, err
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_eval_answers_every_foreign_file_in_one_line(tmp_path, model_pt, tiny_data):
    for path, words in foreign_files(tmp_path, model_pt):
        result = cli_in_process(["eval", str(path), "--data-dir", str(tiny_data), "--device", "cpu"], check=False)
        assert_one_line(result, path, words)


@pytest.mark.timeout(120)
def test_export_answers_every_foreign_file_in_one_line(tmp_path, model_pt):
    for path, words in foreign_files(tmp_path, model_pt):
        result = cli_in_process(["export", str(path), "--format", "safetensors"], check=False)
        assert_one_line(result, path, words)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.npy"))
    afile = tmp_path / "notes.txt"
    for fmt in ("safetensors", "onnx"):
        out = afile / f"model.{fmt}"
        result = cli_in_process(["export", str(model_pt), "--format", fmt, "--out", str(out)], check=False)
        assert_one_line(result, out, f"{afile} is a file, not a folder")
    assert afile.read_text() == "hello\n"


@pytest.mark.timeout(120)
def test_eval_prints_a_line_for_people_and_json_on_request(model_pt, tiny_data):
    import json

    args = ["eval", str(model_pt), "--data-dir", str(tiny_data), "--device", "cpu"]
    line = cli_in_process(args).stdout.strip()
    assert len(line.splitlines()) == 1 and line.startswith("test error ") and "% on 200 images" in line, line
    assert "(model.pt, ResNet-8, iteration 0)" in line, line
    assert_one_line(cli_in_process([*args, "--device", "gpu0"], check=False), "gpu0", "--device must be")
    result = json.loads(cli_in_process([*args, "--json"]).stdout)
    assert result["test_images"] == 200 and result["model"] == "resnet8"
    assert f"{result['test_error']:.2f}%" in line


@pytest.mark.timeout(120)
def test_train_out_pointing_at_a_file_is_refused_before_writing(tmp_path, tiny_data):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    for out in (target, target / "run1"):
        result = cli_in_process(["train", *TINY, "--iters", "2", "--data-dir", str(tiny_data), "--out", str(out)],
                                check=False)
        assert_one_line(result, out, "is a file, not a folder")
        assert str(target) in result.stderr
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


@pytest.mark.timeout(60)
def test_report_answers_bad_paths_in_one_line(tmp_path):
    from .helpers import write_fixture_run

    missing = tmp_path / "no_such_runs"
    afile = tmp_path / "summary.txt"
    afile.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, words in ((missing, "no such folder"), (afile, "not a folder"), (empty, "no runs")):
        assert_one_line(cli_in_process(["report", str(path)], check=False), path, words)
    run = write_fixture_run(tmp_path / "runs", "resnet8", 8, False, 0, 30.0, iters=100)
    assert_one_line(cli_in_process(["report", str(run), "--out", str(afile)], check=False), afile,
                    "is a file, not a folder")
    assert afile.read_text() == "x"


# ----- data files that are not CIFAR-10's size ---------------------------------------------------


@pytest.mark.timeout(180)
def test_short_data_file_runs_and_says_so(tmp_path):
    """data_batch_3.bin cut at a record boundary (150 of 200 records) trains, but the run says
    so in one line naming each short file, and summary.json counts the images used."""
    import json

    from resnetdist.data.cifar import FOLDER, RECORD_BYTES

    from .conftest import write_dataset

    root = write_dataset(tmp_path / "data", 200, 200)
    cut = root / FOLDER / "data_batch_3.bin"
    cut.write_bytes(cut.read_bytes()[: 150 * RECORD_BYTES])
    out = tmp_path / "run"
    result = cli_in_process(["train", *TINY, "--iters", "2", "--data-dir", str(root), "--out", str(out),
                             "--set", "train.eval_every=2"])
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, result.stderr
    assert "data_batch_3.bin holds 150 records" in notes[0] and "data_batch_1.bin holds 200 records" in notes[0]
    assert "test_batch.bin holds 200 records" in notes[0] and "CIFAR-10's files hold 10,000 each" in notes[0]
    assert "training on 950 images" in notes[0] and "testing on 200" in notes[0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_images"], summary["test_images"], summary["val_images"]) == (950, 200, 0)


def test_full_size_files_get_no_note():
    import numpy as np

    from resnetdist.data.cifar import BINARY, Cifar10, Split

    empty = Split(np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0, np.int64))
    data = Cifar10(empty, empty, file_records={name: 10_000 for name in BINARY.files})
    assert data.record_count_note() is None
    data.file_records["data_batch_2.bin"] = 9_000
    assert data.record_count_note().startswith("note: data_batch_2.bin holds 9,000 records (")


# ----- FFCV's .beton files: where they go and how large, said before they are written -----------


@pytest.mark.timeout(120)
def test_beton_size_estimate_is_what_the_writer_writes(tmp_path):
    """The announced size comes from the record counts; checked against real files here (and
    the full CIFAR-10 pair, measured once: 158,486,400 + 33,794,432 bytes)."""
    pytest.importorskip("ffcv")
    from resnetdist.data.beton import beton_bytes, beton_paths, prepare_betons
    from resnetdist.data.cifar import FOLDER

    from .conftest import write_dataset

    assert (beton_bytes(50_000), beton_bytes(10_000)) == (158_486_400, 33_794_432)
    said = []
    out = tmp_path / "beton"

    def announce(line):  # called before any beton exists
        assert not any(p.exists() for p in beton_paths(out))
        said.append(line)

    for per_file, test in ((200, 200), (1000, 700)):
        root = write_dataset(tmp_path / f"d{per_file}", per_file, test)
        said.clear()
        train_path, test_path, _ = prepare_betons(root / FOLDER, out, force=True, announce=announce)
        assert (train_path.stat().st_size, test_path.stat().st_size) == (beton_bytes(5 * per_file), beton_bytes(test))
        total = train_path.stat().st_size + test_path.stat().st_size
        assert len(said) == 1 and str(out) in said[0] and f"about {total / 1e6:,.0f} MB" in said[0], said
        assert f"({5 * per_file:,} images)" in said[0]
    said.clear()
    prepare_betons(root / FOLDER, out, announce=announce)  # up to date: nothing to say
    assert said == []


@pytest.mark.timeout(180)
def test_ffcv_run_says_where_the_betons_go_before_writing(tmp_path, tiny_data):
    pytest.importorskip("ffcv")
    betons = tmp_path / "elsewhere"
    args = ["train", *TINY, "--iters", "2", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"),
            "--loader", "ffcv", "--set", "train.eval_every=2", "--set", f"data.beton_dir={betons}"]
    result = cli_in_process(args)
    notes = [line for line in result.stderr.splitlines() if "beton" in line]
    assert len(notes) == 1 and notes[0].startswith("note: --loader ffcv"), result.stderr
    assert str(betons) in notes[0] and "MB" in notes[0] and "data.beton_dir" in notes[0]
    assert (betons / "train.beton").exists()
    again = cli_in_process([*args[:-2], "--set", "train.eval_every=1", "--out", str(tmp_path / "run2"),
                            "--set", f"data.beton_dir={betons}"])
    assert "beton" not in again.stderr  # already there: nothing written, nothing said
