"""How a process of resnetdist (a worker under torchrun, or the CLI) reports an error nobody
anticipated: one line, as in a torchrun log with one line per worker; RESNETDIST_DEBUG=1
shows Python's plain traceback instead (never typer's rich traceback box)."""

from __future__ import annotations

import pytest

from .conftest import run_cli


@pytest.mark.timeout(120)
def test_an_unexpected_error_is_one_line_and_debug_shows_the_plain_traceback(tmp_path):
    # a folder where a checkpoint file should be: an OSError no handler expects
    folder = tmp_path / "ckpt_0000010.pt"
    folder.mkdir()
    proc = run_cli(["eval", str(folder)], check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: IsADirectoryError: [Errno 21] Is a directory: '{folder}' "
        f"(unexpected; RESNETDIST_DEBUG=1 shows the traceback)"]

    debug = run_cli(["eval", str(folder)], check=False, timeout=60, RESNETDIST_DEBUG="1")
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):\n")
    assert debug.stderr.rstrip().endswith(f"IsADirectoryError: [Errno 21] Is a directory: '{folder}'")
    assert "╭" not in debug.stderr and "│" not in debug.stderr  # no rich box
