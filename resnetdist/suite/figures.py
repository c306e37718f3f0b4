"""The report's figures: Figure 6 (training and test error curves, plain nets and ResNets)
and one curve figure per run (errors and the learning rate). matplotlib, headless.
"""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..rundir import RunDir, read_table
from .discover import GroupKey, RunRecords, distinct_seeds, group_runs


# Figure 6 colours: one per depth, the same on both panels.
DEPTH_COLOURS = {8: "#8c564b", 14: "#9467bd", 20: "#e6a700", 32: "#17a2d8", 44: "#2ca02c",
                 56: "#d62728", 110: "#000000", 1202: "#7f7f7f"}
EXTRA_COLOURS = ["#1f77b4", "#ff7f0e", "#bcbd22", "#e377c2", "#17becf", "#393b79", "#637939"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def mean_curve(group: list[RunRecords], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
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


def _draw_net(ax, group: list[RunRecords], colour: str, label: str, drawn: Drawn):
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


def _panel(ax, title: str, handles: list) -> None:
    from matplotlib.lines import Line2D

    ax.set_title(title)
    ax.set_xlabel("iterations")
    ax.grid(True, alpha=0.3)
    if not handles:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="gray")
    else:
        style = [Line2D([], [], color="k", linestyle="--", linewidth=1.2, label="train error"),
                 Line2D([], [], color="k", linestyle="-", linewidth=2, label="test error")]
        ax.legend(handles=handles + style, loc="best", fontsize=8, framealpha=0.9)


DEEP = (110, 1202)  # Figure 6's third panel: the paper's ResNet-110 and ResNet-1202


def figure6_panels(runs: list[RunRecords]) -> list[tuple[str, list[RunRecords]]]:
    """The paper's panels: plain nets; ResNets (1202 has its own panel); ResNet-110 and
    ResNet-1202, only when one of them is among the runs."""
    resnets = [r for r in runs if not r.plain]
    panels = [("plain networks", [r for r in runs if r.plain]), ("ResNets", [r for r in resnets if r.depth != 1202])]
    deep = [r for r in resnets if r.depth in DEEP]
    return panels + ([("ResNet-110 and ResNet-1202", deep)] if deep else [])


def net_label(run: RunRecords, runs: list[RunRecords], seeds: int) -> str:
    """A net's legend entry, named as in the table: its length when the net ran at several
    lengths, its data when it ran on several data sets, its seed count when they are averaged."""
    same = [r for r in runs if (r.plain, r.depth) == (run.plain, run.depth)]
    lengths = len({r.iterations for r in same}) > 1
    data = ""
    if len({r.data_key for r in same}) > 1:  # the amount tells the data sets apart, else their origin
        data = (f", {run.train_images:,} images" if len({r.train_images for r in same}) > 1 and run.train_images
                else f", {run.data_identity if run.data else 'data unknown'}")
    return (run.net + (f", {run.iterations:,} it." if lengths else "") + data
            + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))


def net_colours(runs: list[RunRecords]) -> dict[GroupKey, str]:
    """One colour per depth (the same on every panel); a shorter run of the same net, or one on
    other data, drawn apart, takes a colour of its own."""
    unusual = sorted({r.depth for r in runs} - set(DEPTH_COLOURS))  # depths the paper's colours leave out
    colours, extra = {}, iter(EXTRA_COLOURS[::-1] * 4)
    for plain, depth in sorted({(r.plain, r.depth) for r in runs}):
        # group_runs' order: the longest length and the most data first, it keeps the depth's colour
        keys = sorted((k for k in group_runs(runs) if k[:2] == (plain, depth)), key=lambda k: -k[2])
        colours[keys[0]] = DEPTH_COLOURS.get(depth) or EXTRA_COLOURS[unusual.index(depth) % len(EXTRA_COLOURS)]
        colours.update((key, next(extra)) for key in keys[1:])
    return colours


def figure6_nets(runs: list[RunRecords]) -> list[tuple[str, list[tuple[str, str, list[RunRecords]]]]]:
    """Figure 6's panels, each with its nets as (legend label, colour, the runs averaged):
    each net's distinct seeds together, each length and data set of a net apart. The PNG and
    the report run's W&B line plots (figure6_series) both draw this."""
    colours = net_colours(runs)
    panels = []
    for panel_title, members in figure6_panels(runs):
        nets = []
        for key, group in group_runs(members).items():
            group = distinct_seeds(group)[0]
            nets.append((net_label(group[0], runs, len(group)), colours[key], group))
        panels.append((panel_title, nets))
    return panels


def figure6_series(runs: list[RunRecords]) -> list[tuple[str, list[tuple[str, list[int], list[float]]]]]:
    """Figure 6 as data: per panel, (series name, iterations, mean error %) for each net's test
    error and training error (the seeds' mean, as the PNG draws them)."""
    out = []
    for panel_title, nets in figure6_nets(runs):
        series = []
        for label, _, group in nets:
            for key, what in (("test_error", "test"), ("train_error", "train")):
                it, mean, _, _ = mean_curve(group, key)
                if it:
                    series.append((f"{label} {what}", it, mean))
        out.append((panel_title, series))
    return out


def figure6_axes(runs: list[RunRecords], title: str = ""):
    """(figure, axes, what was drawn): the Figure 6 layout, one colour per depth, each net's
    distinct seeds averaged, each length of a net drawn apart; the axes hold every point."""
    plt = _pyplot()
    panels = figure6_nets(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), sharey=True)
    drawn = Drawn()
    for ax, (panel_title, nets) in zip(axes, panels):
        handles = [_draw_net(ax, group, colour, label, drawn) for label, colour, group in nets]
        _panel(ax, panel_title, handles)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, _y_top([v for y in drawn.ys for v in y]))
    max_x = max((x[-1] for x in drawn.xs if x), default=1)
    for ax in axes:
        ax.set_xlim(0, 1.03 * max_x)  # a margin: the last point's dot is not cut in half
        _iteration_axis(ax, max_x)
    if title:
        fig.suptitle(textwrap.fill(title, 60 * len(panels)), fontsize=11)
    fig.tight_layout()
    return fig, axes, drawn


def figure6(runs: list[RunRecords], out: Path, title: str = "") -> tuple[Path, list[str]]:
    """Write figure6.png; returns it and a warning when curves have few points."""
    fig, _, drawn = figure6_axes(runs, title)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    few = drawn.few_points()
    warning = (f"{out.name}: {len(few)} of {len(drawn.xs)} curves have fewer than {FEW_POINTS} evaluations "
               f"(dots mark them): {', '.join(few)}; a lower train.eval_every gives fuller curves")
    return out, [warning] if few else []


def lr_steps(run: RunRecords) -> list[tuple[int, float]]:
    """(iteration, lr) wherever the lr changes, from the run's config.toml (its real milestones
    and warm-up) and resolved.toml (the lr scale its machine decided: training/plan.py); the
    logged lr of each evaluation when either is missing or unreadable."""
    from ..training import lr_at

    folder = RunDir(run.path)
    cfg, resolved = folder.read_config(), read_table(folder.resolved, "resolved")
    if cfg is None or not isinstance(scale := resolved.get("lr_scale"), (int, float)):  # an older or hand-made run
        return [(int(r["iter"]), float(r["lr"])) for r in run.records if r.get("lr")]
    steps: list[tuple[int, float]] = []
    for it in range(cfg.optim.iters):
        lr = lr_at(cfg.optim, it, scale, cfg.dist.scale_warmup_iters)
        if not steps or lr != steps[-1][1]:
            steps.append((it, lr))
    return steps + [(cfg.optim.iters, steps[-1][1])] if steps else []


def run_figure(run: RunRecords, out: Path, note: str = "") -> Path:
    """One run's curves (errors, and the learning rate on its own axis); `note`, under the
    title, says its length and data as Figures 6 and 7 do."""
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
    ax.set_title(f"{run.name} ({run.net}, seed {run.seed}{state}) {err}"
                 + (f"\n{textwrap.fill(note, 90)}" if note else ""), fontsize=10 if not note else 9)
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


# Figure 7's nets in the paper, drawn (and listed) first in this order
PAPER_FIGURE7 = ((True, 20), (True, 56), (False, 20), (False, 56), (False, 110))


@dataclass
class NetResponses:
    """One net's layer responses: the mean over its runs (seeds) of each layer's std."""
    net: str
    plain: bool
    iterations: int
    stds: list[float]
    runs: int
    key: GroupKey  # group_runs': its length and data set apart
    label: str  # in the legend (net_label)


def net_responses(per_run: list[tuple[RunRecords, list[float]]], runs: list[RunRecords]) -> list[NetResponses]:
    """Runs grouped by net, length and data set, each layer's std averaged over the group's
    runs; the paper's Figure 7 nets first, then by plain/ResNet and depth."""
    stds = {id(run): values for run, values in per_run}

    def order(item: tuple[GroupKey, list[RunRecords]]):
        (plain, depth, iterations, _), _ = item
        paper = PAPER_FIGURE7.index((plain, depth)) if (plain, depth) in PAPER_FIGURE7 else len(PAPER_FIGURE7)
        return paper, not plain, depth, -iterations

    return [NetResponses(group[0].net, key[0], key[2], [statistics.fmean(v) for v in zip(*(stds[id(r)] for r in group))],
                         len(group), key, net_label(group[0], runs, len(group)))
            for key, group in sorted(group_runs([run for run, _ in per_run]).items(), key=order)]


def figure7(nets: list[NetResponses], runs: list[RunRecords], out: Path, title: str = "") -> Path:
    """The paper's Figure 7: each 3x3 layer's response std, layers in forward order (top) and
    sorted in descending order (bottom); plain nets dashed, ResNets solid, one colour per depth."""
    plt = _pyplot()
    colours = net_colours(runs)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 7))
    for net in nets:
        label, colour = net.label, colours[net.key]
        style = dict(color=colour, linestyle="--" if net.plain else "-", linewidth=1.4, label=label,
                     marker=("s" if net.plain else "o") if len(net.stds) <= 60 else None, markersize=3.5,
                     markerfacecolor="white" if net.plain else colour)
        layers = range(1, len(net.stds) + 1)
        top.plot(layers, net.stds, **style)
        bottom.plot(layers, sorted(net.stds, reverse=True), **style)
    from matplotlib.ticker import MaxNLocator

    for ax, what in ((top, "layer index (original)"), (bottom, "layer index (sorted by magnitude)")):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.set_xlabel(what)
        ax.set_ylabel("std")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    if title:
        fig.suptitle(textwrap.fill(title, 100), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
