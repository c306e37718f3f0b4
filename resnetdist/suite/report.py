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

from pathlib import Path
from typing import Any

from ..config import PAPER_ITERS
from .discover import ReportError, RunRecords, config_data_dir, load_runs
from .figures import figure6, run_figure
from .tables import markdown_table, reference_table, repeated_seeds, runs_table, table_rows


def markdown(runs: list[RunRecords], figure: str | None, curves: dict[str, str], title: str, notes: list[str],
             warnings: list[str] = ()) -> str:
    iters = sorted({r.iterations for r in runs})
    data = sorted({str(config_data_dir(r.path)) for r in runs} - {"None"})
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


def _file_names(runs: list[RunRecords]) -> dict[int, str]:
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
