"""The report's tables: Table 6 as data (one row per net and length), its markdown, the
per-run table and the published figures the runs are set beside.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..config import PAPER_ITERS
from .discover import RunRecords, distinct_seeds, group_runs


# He et al. 2015, Table 6 (test error %, CIFAR-10), and the plain nets' values read off Fig. 6.
PAPER_RESNET: dict[int, str] = {
    20: "8.75", 32: "7.51", 44: "7.17", 56: "6.97", 110: "6.43 (best of 5; 6.61 ± 0.16 mean)", 1202: "7.93",
}
PAPER_PLAIN: dict[int, str] = {20: "~9 †", 56: "~13 †", 110: ">60 †"}
# The seed repository this project grew from (batch 100, channel means), ResNet / plain.
SEED_REPO_RESNET: dict[int, str] = {20: "8.74", 32: "8.30", 44: "7.16", 56: "7.41"}
SEED_REPO_PLAIN: dict[int, str] = {20: "10.08", 32: "11.15", 44: "14.12", 56: "15.39"}
# The rest of the paper's Table 6: (method, layers, parameters, test error %), and the ResNets' sizes (the
# sizes equal models.py's counts: 0.27M, 0.46M, 0.66M, 0.85M, 1.73M, 19.42M).
PAPER_OTHER_METHODS = (("Maxout", "", "", "9.38"), ("NIN", "", "", "8.81"), ("DSN", "", "", "8.22"),
                       ("FitNet", "19", "2.5M", "8.39"), ("Highway", "19", "2.3M", "7.54 (7.72 ± 0.16)"),
                       ("Highway", "32", "1.25M", "8.80"))
PAPER_RESNET_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M", 1202: "19.4M"}


# The paper's recipe (section 4.2): a run with other values is not comparable with its figures.
PAPER_RECIPE: dict[str, Any] = {"optim.batch_size": 128, "optim.lr": 0.1, "optim.momentum": 0.9,
                                "optim.weight_decay": 0.0001, "optim.milestones": [32_000, 48_000], "model.shortcut": "A"}
DATA_WORDS = {"cifar10": "md5-verified CIFAR-10", "modified": "a modified copy of CIFAR-10 (not verified CIFAR-10)",
              "unknown": "data that is not verified CIFAR-10 (unknown origin)"}
PAPER_TRAIN_IMAGES = (50_000, 45_000)  # the whole training set, or 45k with the 5k validation split held out


def images_words(run: RunRecords) -> str:
    """How much data a run used: "5,000 training / 10,000 test images" ("" when not known)."""
    d = run.data
    if d.get("train_images") is None:
        return ""
    return f"{d['train_images']:,} training" + (f" / {d['test_images']:,} test" if d.get("test_images") else "") + " images"


def data_words(runs: list[RunRecords]) -> str:
    """The runs' data in words: one data set in full ("5,000 training / 10,000 test images of
    data that is not verified CIFAR-10 (unknown origin)"), several by their amounts of training
    images per origin ("5,000/50,000 training images of ..."); an amount not known is left out."""
    sets = dict.fromkeys((images_words(r), r.data_identity) for r in runs)
    if len(sets) == 1:
        ((amount, identity),) = sets
        return f"{amount} of {DATA_WORDS[identity]}" if amount else DATA_WORDS[identity]
    parts = []
    for identity in dict.fromkeys(identity for _, identity in sets):
        amounts = sorted({r.train_images for r in runs if r.data_identity == identity and r.train_images}, reverse=True)
        words = f"{'/'.join(f'{a:,}' for a in amounts)} training images of " if amounts else ""
        parts.append(words + DATA_WORDS[identity])
    return " and ".join(parts)


def setting_words(runs: list[RunRecords]) -> str:
    """The runs' length and data in words, for the figures' titles (Figures 6, 7, each run's curves)."""
    iters = "/".join(f"{i:,}" for i in sorted({r.iterations for r in runs}))
    return f"{iters} of the paper's {PAPER_ITERS:,} iterations, on {data_words(runs)}"


def not_comparable(run: RunRecords, data_known: bool = True) -> list[str]:
    """Why a run's figures cannot be set beside the paper's: its data, its length, its recipe
    (empty: comparable). data_known=False: the data is judged elsewhere (an unfinished run has
    no summary.json yet; it follows the finished runs of its net)."""
    reasons = []
    if data_known and run.data_identity != "cifar10":
        reasons.append(DATA_WORDS[run.data_identity])
    if run.train_images is not None and run.train_images not in PAPER_TRAIN_IMAGES:
        reasons.append(f"{run.train_images:,} training images (the paper: 50,000)")
    if run.iterations != PAPER_ITERS:
        reasons.append(f"{run.iterations:,} of the paper's {PAPER_ITERS:,} iterations")
    if not run.recipe:
        reasons.append("recipe unknown (no readable config.toml)")
    elif run.iterations == PAPER_ITERS:  # a shorter run's milestones move with it: its length says enough
        reasons += [f"{key} = {run.recipe[key]} (paper: {value})" for key, value in PAPER_RECIPE.items()
                    if key in run.recipe and run.recipe[key] != value]
    return reasons


def group_reasons(group: list[RunRecords]) -> list[str]:
    """Why a net's runs (one length) are not comparable with the paper; unfinished runs take the
    data identity of their finished ones."""
    any_finished = any(r.finished for r in group)
    reasons = [why for r in group for why in not_comparable(r, data_known=r.finished or not any_finished)]
    return list(dict.fromkeys(reasons))


def comparable_split(runs: list[RunRecords]) -> tuple[list[RunRecords], list[RunRecords]]:
    """(runs comparable with the paper, runs that are not), decided per net and length."""
    comparable, other = [], []
    for group in group_runs(runs).values():
        (other if group_reasons(group) else comparable).extend(group)
    return comparable, other


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def repeated_seeds(runs: list[RunRecords]) -> list[str]:
    return [note for group in group_runs(runs).values() for note in distinct_seeds(group)[1]]


def table_rows(runs: list[RunRecords]) -> list[dict[str, Any]]:
    """Table 6 as data, one row per net and iteration count: what report.md prints and what
    the suite's W&B summary run logs as a table. `runs` counts distinct seeds."""
    rows = []
    for (plain, depth, iters, _), group in group_runs(runs).items():
        group = distinct_seeds(group)[0]
        done = [r for r in group if r.finished and r.test_error is not None]
        errs = [r.test_error for r in done]
        train = [r.train_error for r in done if r.train_error is not None]
        rows.append({"net": group[0].net, "depth": depth, "plain": plain, "iterations": iters,
                     "runs": len(done), "unfinished": len(group) - len(done),
                     "test_error_mean": statistics.fmean(errs) if errs else None,
                     "test_error_std": statistics.stdev(errs) if len(errs) > 1 else None,
                     "test_error_best": min(errs) if errs else None,
                     "train_error_mean": statistics.fmean(train) if train else None,
                     "paper": (PAPER_PLAIN if plain else PAPER_RESNET).get(depth, "–"),
                     "seed_repo": (SEED_REPO_PLAIN if plain else SEED_REPO_RESNET).get(depth, "–"),
                     "comparable": not group_reasons(group),
                     "data_identity": ",".join(sorted({r.data_identity for r in group})),
                     "train_images": group[0].train_images, "data": images_words(group[0])})
    return rows


def markdown_table(runs: list[RunRecords], paper: bool = True) -> str:
    """Table 6 from the runs: with the paper's and the seed repository's columns for runs
    comparable with the paper; for the others, why they are not in place of those columns."""
    last = "paper (Table 6) | seed repo |" if paper else "not comparable with the paper because |"
    head = ("| net | iterations | seeds | test error % (mean ± std) | best | final train error % | " + last
            + "\n|---|---|---|---|---|---|---|" + ("---|" if paper else "") + "\n")
    groups = list(group_runs(runs).values())
    lines = []
    rows = table_rows(runs)
    # a net run on several data sets (a 5,000-image subset beside the whole set): each row says which
    several = {(r["plain"], r["depth"]) for r in rows
               if sum((o["plain"], o["depth"], o["iterations"]) == (r["plain"], r["depth"], r["iterations"]) for o in rows) > 1}
    for row, group in zip(rows, groups):
        cell = _fmt(row["test_error_mean"]) + (f" ± {row['test_error_std']:.2f}" if row["test_error_std"] is not None else "")
        count = f"{row['runs']}" + (f" (+{row['unfinished']} unfinished)" if row["unfinished"] else "")
        why = f"{row['paper']} | {row['seed_repo']}" if paper else "; ".join(group_reasons(group))
        net = row["net"] + (f" ({row['data'] or 'data unknown'})" if (row["plain"], row["depth"]) in several else "")
        lines.append(f"| {net} | {row['iterations']:,} | {count} | {cell} | {_fmt(row['test_error_best'])} | "
                     f"{_fmt(row['train_error_mean'])} | {why} |")
    return head + "\n".join(lines) + "\n"


def runs_table(runs: list[RunRecords]) -> str:
    head = ("| run | net | seed | iterations | data | test error % | train error % | train time (s) | images/s | "
            "device | step | folder |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in sorted(runs, key=lambda r: (r.plain, r.depth, r.iterations, r.seed, r.name)):
        s = r.summary or {}
        last = r.records[-1] if r.records else {}
        its = f"{r.last_iter:,}" + ("" if r.finished else f" of {r.iterations:,} (unfinished)")
        secs = s.get("train_seconds", last.get("train_seconds"))
        ips = s.get("images_per_second", last.get("images_per_second"))
        rows.append(
            f"| {r.name} | {r.net} | {r.seed} | {its} | {images_words(r) or '–'}, {r.data_identity} | {_fmt(r.test_error)} | "
            f"{_fmt(r.train_error)} | {_fmt(secs, 0)} | {_fmt(ips, 0)} | {s.get('device', '–')} | {step_cell(s)} | `{r.path}` |"
        )
    return head + "\n".join(rows) + "\n"


def step_cell(summary: dict) -> str:
    """The step a run trained with, and why when it is not the one asked for (summary.json's
    step and step_reason: an auto graph whose capture failed ran eagerly, ~4x slower)."""
    step, reason = summary.get("step", "–"), summary.get("step_reason") or ""
    return f"{step} ({reason.replace('|', '/')})" if reason.startswith("auto: CUDA-graph capture failed") else step


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


def paper_table6() -> str:
    """The paper's Table 6 as printed: the other methods, then the ResNets (the paper's figures,
    not runs of this project)."""
    rows = [f"| {m} | {layers} | {params} | {err} |" for m, layers, params, err in PAPER_OTHER_METHODS]
    rows += [f"| ResNet | {d} | {PAPER_RESNET_PARAMS[d]} | {PAPER_RESNET[d]} |" for d in sorted(PAPER_RESNET)]
    return "| method (paper's figures, not runs) | # layers | # params | error % |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
