"""Finding and loading runs for the report: run folders (or folders holding them, one level
down) -> RunRecords, what one run directory recorded (metrics.jsonl, summary.json,
config.toml), finished or not. Also which runs count: one per seed of a net.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..rundir import RunDir


DATA_IDENTITIES = ("cifar10", "modified", "unknown")
DATA_FACTS = ("data_identity", "train_images", "test_images", "val_images")  # summary.json's words on the data


class ReportError(RuntimeError):
    """No runs, or a run folder without metrics; the message names the folder."""


@dataclass
class RunRecords:
    path: Path
    name: str
    depth: int
    plain: bool
    seed: int
    iterations: int  # planned (finished: done)
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # the paper's recipe keys, from config.toml
    data_dir: str | None = None  # config.toml's data.dir
    # what the data was (DATA_FACTS): summary.json's, or for an unfinished run those of a finished
    # run on the same data folder (share_data_facts); empty when unknown
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def data_identity(self) -> str:
        """"cifar10" (md5-verified CIFAR-10), "modified" or "unknown" (absent: unknown)."""
        identity = self.data.get("data_identity")
        return identity if identity in DATA_IDENTITIES else "unknown"

    @property
    def train_images(self) -> int | None:
        return self.data.get("train_images")

    @property
    def data_key(self) -> tuple[str, int | None] | None:
        """What keeps runs on different data apart (as different lengths are): the data's
        identity and its number of training images; None: not known (an unfinished run)."""
        return (self.data_identity, self.train_images) if self.data else None

    @property
    def finished(self) -> bool:
        return self.summary is not None  # load_run keeps a summary only when RunDir.finished says so

    @property
    def last_iter(self) -> int:
        if self.summary:
            return int(self.summary.get("iterations", self.iterations))
        return int(self.records[-1]["iter"]) if self.records else 0

    @property
    def test_error(self) -> float | None:
        return self._final("test_error")

    @property
    def train_error(self) -> float | None:
        return self._final("train_error")

    def _final(self, key: str) -> float | None:
        """summary.json's value, else the newest evaluation's."""
        return next((float(r[key]) for r in [self.summary or {}, *reversed(self.records)] if r.get(key) is not None), None)

    @property
    def net(self) -> str:
        return f"{'Plain' if self.plain else 'ResNet'}-{self.depth}"


def find_runs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run folders, folders given that hold no run). A path is a run folder itself, or a
    parent whose immediate sub-folders are searched."""
    runs: list[Path] = []
    empty: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ReportError(f"{p}: no such folder")
        if not p.is_dir():
            raise ReportError(f"{p}: not a folder (give run folders, or folders holding runs)")
        if RunDir(p).is_run():
            runs.append(p)
            continue
        found = sorted(c for c in p.iterdir() if RunDir(c).is_run())
        if not found:
            empty.append(p)
        runs.extend(found)
    unique: dict[Path, Path] = {}  # each folder once, however it was reached
    for r in runs:
        unique.setdefault(r.resolve(), r)
    return list(unique.values()), empty


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Evaluation records sorted by iteration; a torn last line is skipped; a record logged
    twice for one iteration (a resumed run) keeps the later one."""
    if not path.exists():
        return []
    by_iter: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            by_iter[int(rec["iter"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return [by_iter[k] for k in sorted(by_iter)]


def config_facts(cfg: RunConfig) -> dict[str, Any]:
    """What config.toml says of a run, under RunRecords' names: its net, seed, length, recipe, data folder."""
    o = cfg.optim
    recipe = {"optim.batch_size": o.batch_size, "optim.lr": o.lr, "optim.momentum": o.momentum,
              "optim.weight_decay": o.weight_decay, "optim.milestones": list(o.milestones), "model.shortcut": cfg.model.shortcut}
    return {"name": cfg.name, "depth": cfg.model.depth, "plain": cfg.model.plain, "seed": cfg.train.seed,
            "iterations": o.iters, "recipe": recipe, "data_dir": cfg.data.dir or None}


def load_run(path: Path) -> RunRecords:
    path = Path(path)
    run = RunDir(path)
    records = read_metrics(run.metrics)
    cfg = run.read_config()
    # finished by the one rule (RunDir.finished) at the length config.toml plans; without a
    # readable config.toml, at the length the summary itself records
    summary = run.finished(cfg.optim.iters if cfg else (run.read_summary() or {}).get("iterations"))
    if not records and summary is None:
        raise ReportError(f"{path}: no metrics to report (metrics.jsonl is missing or empty and there is "
                          f"no summary.json): the run has not reached its first evaluation")
    # summary.json's words on the net win over config.toml's
    facts = {"name": path.name, "seed": 0, **(config_facts(cfg) if cfg else {}),
             **{k: v for k, v in (summary or {}).items() if k in ("name", "depth", "plain", "seed", "iterations")}}
    if "depth" not in facts:
        raise ReportError(f"{path}: cannot tell which net this is (no summary.json and no readable config.toml)")
    return RunRecords(path=path, records=records, summary=summary, **facts,
                      data={k: summary[k] for k in DATA_FACTS if k in summary} if summary else {})


def load_runs(paths: list[Path]) -> tuple[list[RunRecords], list[str]]:
    """All runs under the given paths, and notes on what was skipped: a sub-folder run that has
    no metrics yet is noted and skipped; a folder named on the command line is always an error."""
    run_dirs, empty = find_runs(paths)
    if empty:
        raise ReportError(f"{', '.join(map(str, empty))}: no runs here (a run folder holds metrics.jsonl or "
                          f"summary.json; parent folders are searched one level down)")
    given = {Path(p).resolve() for p in paths}
    runs, notes = [], []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except ReportError as e:
            if d.resolve() not in given:
                notes.append(str(e))
                continue
            raise
    if not runs:
        raise ReportError("no run with metrics found in " + ", ".join(map(str, paths)))
    share_data_facts(runs)
    return runs, notes


def share_data_facts(runs: list[RunRecords]) -> None:
    """An unfinished run has no summary.json to say what data it trains on: it takes the facts
    of a finished run on the same data folder, else those of its net's finished runs of the same
    length when they all agree (else it stays unknown and is kept apart)."""
    by_folder = {r.data_dir: r.data for r in runs if r.finished and r.data and r.data_dir}
    for r in runs:
        if r.data:
            continue
        if r.data_dir in by_folder:
            r.data = dict(by_folder[r.data_dir])
            continue
        same_net = [o.data for o in runs if o.data and (o.plain, o.depth, o.iterations) == (r.plain, r.depth, r.iterations)]
        if same_net and all(d == same_net[0] for d in same_net):
            r.data = dict(same_net[0])


GroupKey = tuple[bool, int, int, Any]  # plain, depth, iterations, data_key


def group_runs(runs: list[RunRecords]) -> dict[GroupKey, list[RunRecords]]:
    """Runs of one net, one length and one data set (data_key) together."""
    groups: dict[GroupKey, list[RunRecords]] = defaultdict(list)
    for r in runs:
        groups[(r.plain, r.depth, r.iterations, r.data_key)].append(r)
    # ResNets first (as in Table 6), then plain nets; each by depth, the longest run and most data first
    # (data_key None: unknown, as 0 images)
    return dict(sorted(groups.items(), key=lambda kv: (*kv[0][:3], -((kv[0][3] or (0, 0))[1] or 0))))


def distinct_seeds(group: list[RunRecords]) -> tuple[list[RunRecords], list[str]]:
    """One run per seed of a net (a finished one first, then by folder), and one note per seed
    found in several folders: a rerun of a seed is not another sample of the seed spread."""
    by_seed: dict[int, list[RunRecords]] = defaultdict(list)
    for r in sorted(group, key=lambda r: (not r.finished, str(r.path))):
        by_seed[r.seed].append(r)
    notes = [f"{same[0].net} ({same[0].iterations:,} iterations): seed {seed} is in {len(same)} runs "
             f"({', '.join(str(r.path) for r in same)}); only {same[0].path} is counted"
             for seed, same in sorted(by_seed.items()) if len(same) > 1]
    return [same[0] for same in by_seed.values()], notes
