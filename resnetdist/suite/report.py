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
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import PAPER_ITERS
from .discover import ReportError, RunRecords, load_runs
from .figures import NetResponses, figure6, figure6_panels, figure6_series, figure7, net_responses, run_figure
from .responses import FIGURE7_DEFINITION, all_responses, write_caches
from .tables import (comparable_split, data_words, markdown_table, paper_table6, reference_table, repeated_seeds,
                     runs_table, setting_words, table_rows)

def what_the_runs_are(runs: list[RunRecords]) -> list[str]:
    """The runs in words: data identity, iterations run of the paper's 64,000, seeds. Printed
    in the terminal and at the top of report.md."""
    data_sets = Counter(data_words([r]) for r in runs)  # each data set in words (amount, identity): its runs
    per_net = {r.net: {o.seed for o in runs if o.net == r.net} for r in runs}
    _, other = comparable_split(runs)
    lines = ["data: " + "; ".join(f"{n} run(s) on {words}" for words, n in data_sets.items()),
             f"iterations: {', '.join(f'{i:,}' for i in sorted({r.iterations for r in runs}))} "
             f"of the paper's {PAPER_ITERS:,}",
             "seeds per net: " + ", ".join(f"{net} {len(seeds)}" for net, seeds in per_net.items())]
    if other:
        lines.append(f"not comparable with the paper's figures: {len(other)} of {len(runs)} run(s) "
                     f"(other data, amount of data, length or recipe; their own table, without the paper's column)")
    return lines


def default_title(runs: list[RunRecords]) -> str:
    comparable, _ = comparable_split(runs)
    if len(comparable) == len(runs):
        return "ResNets and plain nets on CIFAR-10: reproduction of He et al. 2015, section 4.2"
    return f"ResNets and plain nets, {setting_words(runs)}: not the paper's setting"


def error_tables(runs: list[RunRecords]) -> str:
    """Runs comparable with the paper beside its figures; the others in a table of their own."""
    comparable, other = comparable_split(runs)
    parts = []
    if comparable:
        parts.append("\n## Final test error (comparable with the paper)\n\n" + markdown_table(comparable))
    if other:
        parts.append("\n## Final test error: runs not comparable with the paper\n\n" + markdown_table(other, paper=False))
    return "".join(parts)


def figure7_section(figure: str | None, nets: list[NetResponses]) -> str:
    if not figure:
        return ""
    lines = "\n".join(f"- {n.net}, {n.iterations:,} iterations ({n.runs} run{'s' if n.runs > 1 else ''}): mean std "
                      f"{sum(n.stds) / len(n.stds):.3f} over its {len(n.stds)} layers" for n in nets)
    return (f"\n## Layer responses (Figure 7 layout)\n\n![std of each layer's response]({figure})\n\n"
            f"Top: layers in their original order; bottom: the same values sorted in descending order; plain nets "
            f"dashed, ResNets solid; several seeds of one net are drawn as their mean. Definition: the {FIGURE7_DEFINITION}. "
            f"The paper reads: ResNets have smaller responses than their plain counterparts, deeper ResNets smaller "
            f"still. Values: layer_responses.json.\n\n{lines}\n")


def markdown(runs: list[RunRecords], figure: str | None, curves: dict[str, str], title: str, notes: list[str],
             warnings: list[str] = (), figure7_md: str = "") -> str:
    data = sorted({r.data_dir for r in runs} - {None})
    parts = [f"# {title}\n\n"]
    parts.append(f"{len(runs)} run(s)" + (f"; data folder: {', '.join(f'`{d}`' for d in data)}" if data else "")
                 + ". Errors in %, single-view test error at the end of training.\n\n")
    parts.append("".join(f"- {line}\n" for line in what_the_runs_are(runs)))
    parts.append(error_tables(runs))
    parts.append(
        "\nPaper: He et al. 2015, *Deep Residual Learning for Image Recognition*, Table 6 (CIFAR-10). "
        "† Plain-net values are not in Table 6: they are read off the paper's Figure 6 (approximate). "
        "Seed repo: the repository this project grew from (batch 100, channel means, not the paper's recipe). "
        "mean ± std is over finished runs of distinct seeds (a seed run twice counts once); std needs two or "
        "more; – : no published figure. A run is comparable with the paper when its data is md5-verified "
        f"CIFAR-10, it ran the paper's {PAPER_ITERS:,} iterations and its recipe keys are the paper's.\n"
    )
    parts.append("\n### Published figures (test error %, CIFAR-10)\n\n")
    parts.append(reference_table())
    parts.append("\nThe paper's Table 6 in full (the paper's figures, not runs of this project):\n\n" + paper_table6())
    if figure:
        third = (" A third panel shows ResNet-110 and ResNet-1202." if len(figure6_panels(runs)) == 3 else
                 " The paper's third panel (ResNet-110 and ResNet-1202) is left out: no such run.")
        parts.append(f"\n## Error curves (Figure 6 layout)\n\n![training (dashed) and test (solid) error]({figure})\n\n"
                     "Plain nets left, ResNets right; dashed: training error, solid: test error; one colour per "
                     "depth (a net run at several lengths: one line per length, the length in the legend); several "
                     "seeds of one net are averaged (band: min to max); dots mark evaluations on curves with few "
                     f"points.{third}\n")
    parts.append(figure7_md)
    parts.append("\n## Runs\n\n")
    parts.append(runs_table(runs))
    if curves:
        parts.append("\nPer-run curves: " + ", ".join(f"[{name}]({p})" for name, p in curves.items()) + "\n")
    if warnings:
        parts.append("\n## Notes\n\n" + "\n".join(f"- {n}" for n in warnings) + "\n")
    if notes:
        parts.append("\n## Skipped\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "".join(parts)


def responses_json(responses, nets: list[NetResponses]) -> str:
    """layer_responses.json: every run's stds in forward order, and each net's mean over its runs."""
    return json.dumps({
        "definition": FIGURE7_DEFINITION,
        "runs": [{"name": r.run.name, "net": r.run.net, "seed": r.run.seed, "iterations": r.run.iterations,
                  "path": str(r.run.path), "stds": r.stds} for r in responses],
        "nets": [{"net": n.net, "iterations": n.iterations, "runs": n.runs, "mean_std": sum(n.stds) / len(n.stds),
                  "stds": n.stds} for n in nets],
    }, indent=2) + "\n"


def _file_names(runs: list[RunRecords]) -> list[str]:
    """Each run's curve file name: its folder's name made safe, -2, -3 ... where two share one."""
    names: list[str] = []
    for r in runs:
        base = re.sub(r"[^\w.-]", "_", r.path.name or r.name)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def write_report(paths: list[Path], out: Path | None = None, title: str = "") -> dict[str, Any]:
    """Read the runs and their layer responses, then write report.md, figure6.png, figure7.png,
    layer_responses.json and curves/*.png into `out` (default: the first path given). Every
    input is read and checked before anything is written. Returns what was written."""
    runs, notes = load_runs([Path(p) for p in paths])
    out = Path(out) if out else Path(paths[0])
    from ..checkpoint import not_a_folder  # (torch: loaded only when a report is written)

    if (taken := not_a_folder(out)) is not None:
        raise ReportError(f"--out {out}" + ("" if taken == out else f": {taken}") + " is a file, not a folder")
    responses, left_out = all_responses(runs)
    notes += left_out + [f"{r.path}: no evaluation records in metrics.jsonl, not drawn in Figure 6"
                         for r in runs if not r.records]
    out.mkdir(parents=True, exist_ok=True)
    write_caches(responses)
    title = title or default_title(runs)
    figure, warnings = figure6(runs, out / "figure6.png", title)
    warnings = repeated_seeds(runs) + warnings
    nets = net_responses([(r.run, r.stds) for r in responses], runs)
    fig7 = figure7(nets, runs, out / "figure7.png", title) if nets else None
    if nets:
        (out / "layer_responses.json").write_text(responses_json(responses, nets))
    (out / "curves").mkdir(exist_ok=True)
    curves = {name: str(run_figure(r, out / "curves" / f"{name}.png", setting_words([r])).relative_to(out))
              for r, name in zip(runs, _file_names(runs)) if r.records}
    md = out / "report.md"
    md.write_text(markdown(runs, figure.name, curves, title, notes, warnings,
                           figure7_section(fig7.name if fig7 else None, nets)))
    about = "".join(f"{line}\n" for line in what_the_runs_are(runs))
    return {"report": str(md), "figure": str(figure), "figure7": str(fig7) if fig7 else None,
            "curves": [str(out / c) for c in curves.values()], "runs": len(runs), "skipped": notes,
            "warnings": warnings, "table": table_rows(runs), "markdown": about + error_tables(runs),
            "figure6_series": figure6_series(runs)}
