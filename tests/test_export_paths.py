"""`export` to a path it cannot write: refused before converting, one line, exit 2, for both
formats; the files it writes have the mode of every other output (0666 less the umask); `eval`
with the test set alone, and of a file that is no checkpoint; --set values meant as TOML that
do not parse, a --data-dir that is a file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .conftest import cli_in_process


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_an_unwritable_out_is_one_line_and_exit_2_before_converting(tiny_model, tmp_path, fmt):
    pytest.importorskip("onnx" if fmt == "onnx" else "safetensors")
    for out, why in ((Path("/proc") / f"m.{fmt}", "/proc is not writable"),
                     (tiny_model / f"m.{fmt}", f"{tiny_model} is a file, not a folder"),
                     (tmp_path, "is a folder; give a file name inside it")):
        result = cli_in_process(["export", str(tiny_model), "--format", fmt, "--out", str(out)], check=False)
        assert result.exit_code == 2, result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [f"error: --out {out}: " + result.stderr.split(": ", 2)[2].strip()]
        assert why in result.stderr and not result.stdout.strip(), result.stdout + result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(120)
def test_safetensors_and_its_mean_have_the_mode_of_the_other_outputs(tiny_model, tmp_path):
    result = cli_in_process(["export", str(tiny_model), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")])
    # a sentence, as eval prints (the JSON behind --json)
    assert result.stdout == (f"wrote {tmp_path / 'm.safetensors'} (resnet8, iteration 6) and its mean image "
                             f"{tmp_path / 'm.mean.npy'} (inputs: x / 255 - mean)\n")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("m.safetensors", "m.mean.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(tiny_model.stat().st_mode) == 0o666 & ~umask  # model.pt, for comparison


@pytest.mark.timeout(120)
def test_eval_needs_only_the_test_set_and_names_a_file_that_is_not_a_checkpoint(tiny_model, tmp_path, tiny_data):
    from resnetdist.data.cifar import FOLDER

    only_test = tmp_path / "test-only" / FOLDER
    only_test.mkdir(parents=True)
    (only_test / "test_batch.bin").write_bytes((tiny_data / FOLDER / "test_batch.bin").read_bytes())
    result = cli_in_process(["eval", str(tiny_model), "--data-dir", str(only_test.parent), "--device", "cpu"])
    assert "on 200 images" in result.stdout, result.stdout
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    result = cli_in_process(["eval", str(text)], check=False)
    assert result.exit_code == 2 and "not a torch file" in result.stderr and "KeyError" not in result.stderr


@pytest.mark.parametrize("value, named", [('log.name="unterminated', "is not valid TOML"),
                                          ("optim.milestones=[1,2", "is not valid TOML")])
def test_a_set_value_meant_as_toml_that_does_not_parse_is_refused(value, named, tmp_path):
    result = cli_in_process(["train", "--dry-run", "--set", value, "--out", str(tmp_path / "r")], check=False)
    assert result.exit_code == 2 and named in result.stderr and value in result.stderr, result.stderr


def test_a_data_dir_that_is_a_file_is_named_as_a_file(tmp_path):
    afile = tmp_path / "data.bin"
    afile.write_bytes(b"x")
    result = cli_in_process(["train", "--dry-run", "--data-dir", str(afile)], check=False)
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr, result.stderr
