"""`resnetdist report RUN_DIR... [--out DIR]`: what a set of runs achieved, next to the paper.

Input: run folders (each holds metrics.jsonl and, once finished, summary.json), or parent
folders whose sub-folders are runs (searched one level down). Output, in --out:

- report.md: final test error per net (mean +- std over seeds, number of runs, best run),
  beside He et al. 2015 Table 6 and the seed repository's figures, and one row per run;
- figure6.png: the paper's Figure 6 layout, plain nets left and ResNets right, training
  error dashed, test error solid, one colour per depth, x = iterations, y = error (%);
- curves/<run>.png: one figure per run (train/test error and the learning rate).

A run without summary.json (still running, or stopped) is shown with its last evaluation and
marked unfinished. Runs of the same net with different iteration counts are kept apart.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PAPER_ITERS, from_dict, read_toml

# He et al. 2015, Table 6 (test error %, CIFAR-10), and the plain nets' values read off Fig. 6.
PAPER_RESNET: dict[int, str] = {
    20: "8.75", 32: "7.51", 44: "7.17", 56: "6.97", 110: "6.43 (best of 5; 6.61 ± 0.16 mean)", 1202: "7.93",
}
PAPER_PLAIN: dict[int, str] = {20: "~9 †", 56: "~13 †", 110: ">60 †"}
# The seed repository this project grew from (batch 100, channel means), ResNet / plain.
SEED_REPO_RESNET: dict[int, str] = {20: "8.74", 32: "8.30", 44: "7.16", 56: "7.41"}
SEED_REPO_PLAIN: dict[int, str] = {20: "10.08", 32: "11.15", 44: "14.12", 56: "15.39"}

# Figure 6 colours: one per depth, the same on both panels.
DEPTH_COLOURS = {8: "#8c564b", 14: "#9467bd", 20: "#e6a700", 32: "#17a2d8", 44: "#2ca02c",
                 56: "#d62728", 110: "#000000", 1202: "#7f7f7f"}
EXTRA_COLOURS = ["#1f77b4", "#ff7f0e", "#bcbd22", "#e377c2", "#17becf", "#393b79", "#637939"]

RUN_FILES = ("summary.json", "metrics.jsonl", "config.toml")


class ReportError(RuntimeError):
    """No runs, or a run folder without metrics; the message names the folder."""


@dataclass
class Run:
    path: Path
    name: str
    model: str
    depth: int
    plain: bool
    seed: int
    iterations: int  # planned (finished: done)
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def last_iter(self) -> int:
        if self.summary:
            return int(self.summary.get("iterations", self.iterations))
        return int(self.records[-1]["iter"]) if self.records else 0

    @property
    def test_error(self) -> float | None:
        if self.summary and self.summary.get("test_error") is not None:
            return float(self.summary["test_error"])
        return _last(self.records, "test_error")

    @property
    def train_error(self) -> float | None:
        if self.summary and self.summary.get("train_error") is not None:
            return float(self.summary["train_error"])
        return _last(self.records, "train_error")

    @property
    def net(self) -> str:
        return f"{'Plain' if self.plain else 'ResNet'}-{self.depth}"


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(records):
        if r.get(key) is not None:
            return float(r[key])
    return None


# ----- finding and reading runs ----------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


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
        if is_run_dir(p):
            runs.append(p)
            continue
        found = sorted(c for c in p.iterdir() if is_run_dir(c)) if p.is_dir() else []
        if not found:
            empty.append(p)
        runs.extend(found)
    seen, unique = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            unique.append(r)
    return unique, empty


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Evaluation records sorted by iteration; a torn last line is skipped; a record logged
    twice for one iteration (a resumed run) keeps the later one."""
    by_iter: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            by_iter[int(rec["iter"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return [by_iter[k] for k in sorted(by_iter)]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _config_info(path: Path) -> dict[str, Any]:
    """model / seed / iterations from config.toml, for a run that has no summary yet."""
    try:
        cfg = from_dict(read_toml(path / "config.toml"), str(path / "config.toml"))
    except Exception:  # noqa: BLE001 - missing or unreadable: fall back to the folder name
        return {}
    return {"model": cfg.model.name, "depth": cfg.model.depth, "plain": cfg.model.plain, "seed": cfg.train.seed,
            "iterations": cfg.optim.iters, "name": cfg.name}


def load_run(path: Path) -> Run:
    path = Path(path)
    records = read_metrics(path / "metrics.jsonl")
    summary = _read_json(path / "summary.json")
    if not records and (summary is None or summary.get("test_error") is None):
        raise ReportError(f"{path}: no metrics to report (metrics.jsonl is missing or empty and there is "
                          f"no summary.json): the run has not reached its first evaluation")
    info = _config_info(path)
    if summary:
        info.update({k: summary[k] for k in ("name", "model", "depth", "plain", "seed", "iterations") if k in summary})
    if "depth" not in info:
        raise ReportError(f"{path}: cannot tell which net this is (no summary.json and no readable config.toml)")
    return Run(path=path, name=str(info.get("name", path.name)), model=str(info["model"]), depth=int(info["depth"]),
               plain=bool(info["plain"]), seed=int(info.get("seed", 0)), iterations=int(info["iterations"]),
               records=records, summary=summary)


def load_runs(paths: list[Path], skip_empty: bool = False) -> tuple[list[Run], list[str]]:
    """All runs under the given paths, and notes on what was skipped. With skip_empty, a
    sub-folder run that has no metrics yet is noted and skipped; a folder named on the command
    line that holds no metrics is always an error."""
    run_dirs, empty = find_runs(paths)
    if empty:
        raise ReportError(
            f"{', '.join(map(str, empty))}: no runs here (a run folder holds metrics.jsonl or summary.json; "
            f"parent folders are searched one level down)"
        )
    given = {Path(p).resolve() for p in paths}
    runs, notes = [], []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except ReportError as e:
            if skip_empty and d.resolve() not in given:
                notes.append(str(e))
                continue
            raise
    if not runs:
        raise ReportError("no run with metrics found in " + ", ".join(map(str, paths)))
    return runs, notes


# ----- the table ---------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def group_runs(runs: list[Run]) -> dict[tuple[bool, int, int], list[Run]]:
    groups: dict[tuple[bool, int, int], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.plain, r.depth, r.iterations)].append(r)
    # ResNets first (as in Table 6), then plain nets; each by depth
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])))


def paper_value(plain: bool, depth: int) -> str:
    return (PAPER_PLAIN if plain else PAPER_RESNET).get(depth, "–")


def seed_repo_value(plain: bool, depth: int) -> str:
    return (SEED_REPO_PLAIN if plain else SEED_REPO_RESNET).get(depth, "–")


def distinct_seeds(group: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per seed of a net (a finished one first, then by folder), and one note per seed
    found in several folders: a rerun of a seed is not another sample of the seed spread."""
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for r in sorted(group, key=lambda r: (not r.finished, str(r.path))):
        by_seed[r.seed].append(r)
    notes = [f"{same[0].net} ({same[0].iterations:,} iterations): seed {seed} is in {len(same)} runs "
             f"({', '.join(str(r.path) for r in same)}); only {same[0].path} is counted"
             for seed, same in sorted(by_seed.items()) if len(same) > 1]
    return [same[0] for same in by_seed.values()], notes


def repeated_seeds(runs: list[Run]) -> list[str]:
    return [note for group in group_runs(runs).values() for note in distinct_seeds(group)[1]]


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Table 6 as data, one row per net and iteration count: what report.md prints and what
    the suite's W&B summary run logs as a table. `runs` counts distinct seeds."""
    rows = []
    for (plain, depth, iters), group in group_runs(runs).items():
        group = distinct_seeds(group)[0]
        done = [r for r in group if r.finished and r.test_error is not None]
        errs = [r.test_error for r in done]
        mean, std = mean_std(errs) if errs else (None, None)
        train = [r.train_error for r in done if r.train_error is not None]
        rows.append({"net": group[0].net, "depth": depth, "plain": plain, "iterations": iters,
                     "runs": len(done), "unfinished": len(group) - len(done), "test_error_mean": mean,
                     "test_error_std": std, "test_error_best": min(errs) if errs else None,
                     "train_error_mean": statistics.fmean(train) if train else None,
                     "paper": paper_value(plain, depth), "seed_repo": seed_repo_value(plain, depth)})
    return rows


def markdown_table(runs: list[Run]) -> str:
    head = ("| net | iterations | seeds | test error % (mean ± std) | best | final train error % | "
            "paper (Table 6) | seed repo |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in table_rows(runs):
        cell = "–" if row["test_error_mean"] is None else f"{row['test_error_mean']:.2f}" + (
            f" ± {row['test_error_std']:.2f}" if row["test_error_std"] is not None else "")
        count = f"{row['runs']}" + (f" (+{row['unfinished']} unfinished)" if row["unfinished"] else "")
        lines.append(f"| {row['net']} | {row['iterations']:,} | {count} | {cell} | {_fmt(row['test_error_best'])} | "
                     f"{_fmt(row['train_error_mean'])} | {row['paper']} | {row['seed_repo']} |")
    return head + "\n".join(lines) + "\n"


def runs_table(runs: list[Run]) -> str:
    head = ("| run | net | seed | iterations | test error % | train error % | train time (s) | images/s | "
            "device | folder |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in sorted(runs, key=lambda r: (r.plain, r.depth, r.iterations, r.seed, r.name)):
        s = r.summary or {}
        last = r.records[-1] if r.records else {}
        its = f"{r.last_iter:,}" + ("" if r.finished else f" of {r.iterations:,} (unfinished)")
        secs = s.get("train_seconds", last.get("train_seconds"))
        ips = s.get("images_per_second", last.get("images_per_second"))
        rows.append(
            f"| {r.name} | {r.net} | {r.seed} | {its} | {_fmt(r.test_error)} | {_fmt(r.train_error)} | "
            f"{_fmt(secs, 0)} | {_fmt(ips, 0)} | {s.get('device', '–')} | `{r.path}` |"
        )
    return head + "\n".join(rows) + "\n"


def reference_table() -> str:
    """The published figures for every depth, whatever was run."""
    depths = sorted(set(PAPER_RESNET) | set(PAPER_PLAIN) | set(SEED_REPO_RESNET))
    head = "| net | " + " | ".join(str(d) for d in depths) + " |\n|---|" + "---|" * len(depths) + "\n"
    rows = [
        ("ResNet (paper, Table 6)", PAPER_RESNET), ("Plain (paper, Fig. 6, read off the plot) †", PAPER_PLAIN),
        ("ResNet (seed repo)", SEED_REPO_RESNET), ("Plain (seed repo)", SEED_REPO_PLAIN),
    ]
    return head + "\n".join(
        f"| {label} | " + " | ".join(values.get(d, "") for d in depths) + " |" for label, values in rows
    ) + "\n"


def markdown(runs: list[Run], figure: str | None, curves: dict[str, str], title: str, notes: list[str],
             warnings: list[str] = ()) -> str:
    iters = sorted({r.iterations for r in runs})
    data = sorted({str(_config_data_dir(r.path)) for r in runs} - {"None"})
    parts = [f"# {title}\n\n"]
    parts.append(f"{len(runs)} run(s); iterations: {', '.join(f'{i:,}' for i in iters)}"
                 + (f"; data: {', '.join(f'`{d}`' for d in data)}" if data else "")
                 + ". Errors in %, single-view test error at the end of training.\n")
    if any(i != PAPER_ITERS for i in iters):
        parts.append(f"\n> Runs shorter or longer than the paper's {PAPER_ITERS:,} iterations are not comparable "
                     f"with the paper's figures, which are shown for reference only.\n")
    parts.append("\n## Final test error\n\n")
    parts.append(markdown_table(runs))
    parts.append(
        "\nPaper: He et al. 2015, *Deep Residual Learning for Image Recognition*, Table 6 (CIFAR-10). "
        "† Plain-net values are not in Table 6: they are read off the paper's Figure 6 (approximate). "
        "Seed repo: the repository this project grew from (batch 100, channel means, not the paper's recipe). "
        "mean ± std is over finished runs of distinct seeds (a seed run twice counts once); std needs two or "
        "more; – : no published figure.\n"
    )
    parts.append("\n### Published figures (test error %, CIFAR-10)\n\n")
    parts.append(reference_table())
    if figure:
        parts.append(f"\n## Error curves (Figure 6 layout)\n\n![training (dashed) and test (solid) error]({figure})\n\n"
                     "Plain nets left, ResNets right; dashed: training error, solid: test error; one colour per "
                     "depth; several seeds of one net are averaged (band: min to max); dots mark evaluations on curves with "
                     "few points.\n")
    parts.append("\n## Runs\n\n")
    parts.append(runs_table(runs))
    if curves:
        parts.append("\nPer-run curves: " + ", ".join(f"[{name}]({p})" for name, p in curves.items()) + "\n")
    if warnings:
        parts.append("\n## Notes\n\n" + "\n".join(f"- {n}" for n in warnings) + "\n")
    if notes:
        parts.append("\n## Skipped\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "".join(parts)


def _config_data_dir(path: Path) -> str | None:
    try:
        return read_toml(path / "config.toml").get("data", {}).get("dir") or None
    except Exception:  # noqa: BLE001
        return None


# ----- figures -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def depth_colour(depth: int, depths: list[int]) -> str:
    if depth in DEPTH_COLOURS:
        return DEPTH_COLOURS[depth]
    extra = [d for d in sorted(depths) if d not in DEPTH_COLOURS]
    return EXTRA_COLOURS[extra.index(depth) % len(EXTRA_COLOURS)]


def mean_curve(group: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Iterations logged by every run of the group, with the mean, min and max of `key`."""
    per_run = [{int(r["iter"]): float(r[key]) for r in run.records if r.get(key) is not None} for run in group]
    per_run = [p for p in per_run if p]
    if not per_run:
        return [], [], [], []
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    vals = [[p[i] for p in per_run] for i in common]
    return common, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _y_top(values: list[float]) -> float:
    """The paper's 0-20% axis when every point fits in it; else up to the highest point (the
    early ~90% errors included: an axis that cuts them off hides data)."""
    top = max(values, default=0.0)
    return float(min(100.0, max(20.0, 1.05 * top))) if top < 100 else 101.0


def _iteration_axis(ax, max_x: float) -> None:
    """Plain integers for short runs, thousands ("32k") for long ones."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    if max_x >= 5000:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))


FEW_POINTS = 5  # a curve with fewer evaluations than this is marked in the figure and warned about
MARK_UP_TO = 30  # curves with at most this many points get a dot per evaluation


@dataclass
class Drawn:
    """What a figure drew: every curve's points, for the axis limits and the few-points warning."""
    xs: list[list[int]] = field(default_factory=list)
    ys: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def few_points(self) -> list[str]:
        return [f"{label} ({len(x)})" for label, x in zip(self.labels, self.xs) if len(x) < FEW_POINTS]


def _draw_net(ax, group: list[Run], colour: str, label: str, drawn: Drawn):
    """The mean train (dashed) and test (solid) curves of one net's seeds, with the min-max band."""
    from matplotlib.lines import Line2D

    for key, style, width in (("train_error", "--", 1.2), ("test_error", "-", 2.0)):
        it, mean, lo, hi = mean_curve(group, key)
        if not it:
            continue
        marker = "o" if len(it) <= MARK_UP_TO else None
        ax.plot(it, mean, style, color=colour, linewidth=width, marker=marker, markersize=4 if len(it) < FEW_POINTS else 2.5)
        if len(group) > 1:
            ax.fill_between(it, lo, hi, color=colour, alpha=0.12, linewidth=0)
        drawn.xs.append(it)
        drawn.ys.append(hi)
        drawn.labels.append(f"{label} {key.split('_')[0]}")
    return Line2D([], [], color=colour, linewidth=2, label=label)


def _panel(ax, plain: bool, nets: list[Run], handles: list) -> None:
    from matplotlib.lines import Line2D

    ax.set_title("plain networks" if plain else "ResNets")
    ax.set_xlabel("iterations")
    ax.grid(True, alpha=0.3)
    if not nets:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="gray")
    style = [Line2D([], [], color="k", linestyle="--", linewidth=1.2, label="train error"),
             Line2D([], [], color="k", linestyle="-", linewidth=2, label="test error")]
    if handles:
        ax.legend(handles=handles + style, loc="best", fontsize=8, framealpha=0.9)


def figure6_axes(runs: list[Run], title: str = ""):
    """(figure, axes, what was drawn): the Figure 6 layout, one colour per depth, each net's
    distinct seeds averaged; the axes hold every point."""
    plt = _pyplot()
    depths = sorted({r.depth for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    drawn = Drawn()
    for ax, plain in zip(axes, (True, False)):
        nets = [r for r in runs if r.plain == plain]
        handles = []
        for depth in sorted({r.depth for r in nets}):
            group = distinct_seeds([r for r in nets if r.depth == depth])[0]
            label = f"{'plain' if plain else 'ResNet'}-{depth}" + (f" ({len(group)} seeds)" if len(group) > 1 else "")
            handles.append(_draw_net(ax, group, depth_colour(depth, depths), label, drawn))
        _panel(ax, plain, nets, handles)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, _y_top([v for y in drawn.ys for v in y]))
    max_x = max((x[-1] for x in drawn.xs if x), default=1)
    for ax in axes:
        ax.set_xlim(0, 1.03 * max_x)  # a margin: the last point's dot is not cut in half
        _iteration_axis(ax, max_x)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig, axes, drawn


def figure6(runs: list[Run], out: Path, title: str = "") -> tuple[Path, list[str]]:
    """Write figure6.png; returns it and a warning when curves have few points."""
    fig, _, drawn = figure6_axes(runs, title)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    few = drawn.few_points()
    warning = (f"{out.name}: {len(few)} of {len(drawn.xs)} curves have fewer than {FEW_POINTS} evaluations "
               f"(dots mark them): {', '.join(few)}; a lower train.eval_every gives fuller curves")
    return out, [warning] if few else []


def lr_steps(run: Run) -> list[tuple[int, float]]:
    """(iteration, lr) wherever the lr changes, from the run's config.toml (its real milestones
    and warm-up); the logged lr of each evaluation when there is no readable config."""
    from ..train.schedule import lr_at

    try:
        cfg = from_dict(read_toml(run.path / "config.toml"), str(run.path / "config.toml"))
    except Exception:  # noqa: BLE001 - an older or hand-made run folder
        return [(int(r["iter"]), float(r["lr"])) for r in run.records if r.get("lr")]
    world = int((run.summary or {}).get("world_size", 1))
    scale = world if cfg.dist.batch_scaling == "per_rank" else 1
    steps: list[tuple[int, float]] = []
    for it in range(cfg.optim.iters):
        lr = lr_at(cfg.optim, it, scale, cfg.dist.scale_warmup_iters)
        if not steps or lr != steps[-1][1]:
            steps.append((it, lr))
    return steps + [(cfg.optim.iters, steps[-1][1])] if steps else []


def run_figure(run: Run, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    it = [int(r["iter"]) for r in run.records]
    colour = "#d62728" if run.plain else "#1f77b4"
    for key, style, label in (("train_error", "--", "train error"), ("test_error", "-", "test error"),
                              ("val_error", ":", "val error")):
        pts = [(int(r["iter"]), float(r[key])) for r in run.records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, color=colour if key != "val_error" else "#2ca02c", marker="o",
                    markersize=3, linewidth=1.6, label=label)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.grid(True, alpha=0.3)
    lrs = lr_steps(run)
    if lrs:
        ax2 = ax.twinx()
        ax2.step(*zip(*lrs), where="post", color="gray", linewidth=1, alpha=0.7, label="lr")
        ax2.set_yscale("log")
        ax2.set_ylabel("learning rate", color="gray")
    state = "" if run.finished else f", unfinished at {run.last_iter:,}"
    err = f"test error {run.test_error:.2f}%" if run.test_error is not None else ""
    ax.set_title(f"{run.name} ({run.net}, seed {run.seed}{state}) {err}", fontsize=10)
    if it:
        ax.set_xlim(0, 1.03 * max(it))
        _iteration_axis(ax, max(it))
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    (ax2 if lrs else ax).legend(handles, labels, loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _file_names(runs: list[Run]) -> dict[int, str]:
    names: dict[int, str] = {}
    used: set[str] = set()
    for i, r in enumerate(runs):
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in (r.path.name or r.name))
        name, k = base, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names[i] = name
    return names


def write_report(paths: list[Path], out: Path | None = None, title: str = "", skip_empty: bool = True) -> dict[str, Any]:
    """Read the runs, write report.md, figure6.png and curves/*.png into `out` (default: the
    first path given). Returns what was written."""
    runs, notes = load_runs([Path(p) for p in paths], skip_empty=skip_empty)
    out = Path(out) if out else Path(paths[0])
    from ..checkpoint import not_a_folder  # (torch: loaded only when a report is written)

    if (taken := not_a_folder(out)) is not None:
        raise ReportError(f"--out {out}" + ("" if taken == out else f": {taken}") + " is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    title = title or "ResNets and plain nets on CIFAR-10: reproduction of He et al. 2015, section 4.2"
    figure, warnings = figure6(runs, out / "figure6.png", title)
    warnings = repeated_seeds(runs) + warnings
    (out / "curves").mkdir(exist_ok=True)
    curves = {}
    for i, name in _file_names(runs).items():
        if runs[i].records:
            curves[name] = str(run_figure(runs[i], out / "curves" / f"{name}.png").relative_to(out))
    md = out / "report.md"
    md.write_text(markdown(runs, figure.name, curves, title, notes, warnings))
    return {"report": str(md), "figure": str(figure), "curves": [str(out / c) for c in curves.values()],
            "runs": len(runs), "skipped": notes, "warnings": warnings, "table": table_rows(runs),
            "markdown": markdown_table(runs)}
