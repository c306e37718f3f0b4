"""`resnetdist.train(config) -> summary`: a training run from Python (a notebook, a script, a
sweep's function), the same run `resnetdist train` makes, in this process.

Unlike the command it leaves the calling process as it found it: the interpreter's signal
handlers stay (unless handle_signals=True: then SIGTERM/SIGUSR1 and a first Ctrl-C stop at a
checkpoint, as for the command), a detected hang raises PeerLost here instead of ending the
process (dist.setup's on_hang="raise"), and faults are the exceptions errors.py lists, each
with its message, instead of exit codes. It writes only the run folder (train.out, default
runs/<name>), and rerunning a finished run returns its summary.json without training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig, load_config


def train(config: RunConfig | dict[str, Any] | str | Path | None = None, *, overrides: list[str] | tuple[str, ...] = (),
          handle_signals: bool = False) -> dict[str, Any]:
    """Train one net with the paper's recipe in this process and return its summary
    (summary.json's contents). `config`: a RunConfig, a dict of sections ({"model": {"n": 3}}:
    merged over the defaults as command-line flags are, so a shorter optim.iters moves the
    default milestones with it), a TOML file, or None (the paper's defaults); then `overrides`
    ("section.key=value", as --set). The run folder, its files and resuming are the command's:
    the same config and folder continue from the newest checkpoint."""
    from .dist import world_size_from_env
    from .training.worker import AlreadyFinished, main, preflight

    if isinstance(config, RunConfig) and overrides:
        config = config.to_dict()
    if isinstance(config, RunConfig):
        config.validate()
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = load_config(Path(config), overrides=list(overrides))
    else:
        cfg = load_config(flags=config or {}, overrides=list(overrides))
    prepared = preflight(cfg, world_size_from_env())  # every check before anything is written (ConfigError, DataError, RunDirBusy)
    try:
        return main(cfg, prepared, signals=handle_signals, on_hang="raise")
    except AlreadyFinished as e:
        return e.summary
