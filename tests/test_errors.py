"""How a process of resnetdist (a worker under torchrun, or the CLI) reports an error nobody
anticipated: one line, as in a torchrun log with one line per worker; RESNETDIST_DEBUG=1
shows Python's plain traceback instead (never typer's rich traceback box).

Every input a user can type has its own one-line error (tests/test_user_inputs.py), so the
bug here is a command added for the test that divides by zero, run through the real entry
point (`resnetdist.cli.main`) in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO, cli_env

BUGGY_COMMAND = """
import resnetdist.cli as cli

@cli.app.command("divide")
def divide() -> None:
    print(1 / 0)

sys.argv = ["resnetdist", "divide"]
cli.main()
"""


def run_buggy(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys\n" + BUGGY_COMMAND], cwd=REPO, env=cli_env(**env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_an_unexpected_error_is_one_line_and_debug_shows_the_plain_traceback():
    proc = run_buggy()
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: ZeroDivisionError: division by zero (unexpected; RESNETDIST_DEBUG=1 shows the traceback)"]

    debug = run_buggy(RESNETDIST_DEBUG="1")
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):\n")
    assert debug.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "╭" not in debug.stderr and "│" not in debug.stderr  # no rich box
