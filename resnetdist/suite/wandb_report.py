"""The suite's W&B summary run: the report's table (Table 6), Figures 6 and 7, the layer
responses and report.md, logged to one run of job type "report" in the suite's group, beside
the runs it summarises, with training/metrics.py's W&B mode and settings, so a suite and its
runs log the same way.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..config import LogConfig
from ..rundir import read_json
from ..training import env_tags, quiet_wandb_telemetry, wandb_mode_here, wandb_settings, warn

SUITE_TABLE_KEY = "table6"  # the summary run's history key for the report's table
RESPONSES_TABLE_KEY = "layer_responses"  # ... and for Figure 7's values


def figure6_plots(wandb, series: list[tuple[str, list[tuple[str, list[int], list[float]]]]]) -> dict[str, Any]:
    """Figure 6 as W&B line plots, one per panel (`figure6/<panel>`): each net's mean test and
    training error against the iteration, zoomable and with its values in the run (the PNG
    stays beside them as `figure6`)."""
    return {f"figure6/{title}": wandb.plot.line_series(
                xs=[it for _, it, _ in curves], ys=[err for _, _, err in curves],
                keys=[name for name, _, _ in curves], title=f"Figure 6: {title} (error %)", xname="iteration")
            for title, curves in series if curves}


def log_suite_report(cfg: LogConfig, wandb_dir: Path, group: str, run_id: str | None, written: dict[str, Any]) -> str | None:
    """The suite's summary run (job_type "report", in the suite's group) from what the report
    wrote (report.write_report's answer): its table as a wandb.Table under `table6`, Figure 6
    as line plots and as an image, Figure 7 and layer_responses.json when written (a table
    `layer_responses`, one row per run and layer, each net's mean std in the summary), and
    report.md as a file. `run_id` continues an earlier summary run of the same suite. Returns
    the run id, None when W&B is disabled or not installed."""
    mode = wandb_mode_here(cfg.wandb_mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        warn("wandb is not installed (pip install 'resnetdist[wandb]'); the report is not logged to W&B")
        return None
    if mode == "offline":
        quiet_wandb_telemetry()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        mode=mode, settings=wandb_settings(wandb, cfg), dir=str(wandb_dir), id=run_id or uuid.uuid4().hex[:12],
        resume="allow", project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "resnetdist",
        entity=cfg.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
        group=group, job_type="report", name=f"{group}-report", reinit="finish_previous",
        tags=sorted(set(cfg.wandb_tags) | set(env_tags()) | {"report"}),
    )
    rows, report = written["table"], Path(written["report"])
    responses_file = report.parent / "layer_responses.json"
    responses = read_json(responses_file)
    values: dict[str, Any] = {SUITE_TABLE_KEY: wandb.Table(columns=list(rows[0]) if rows else [],
                                                           data=[list(r.values()) for r in rows]),
                              **figure6_plots(wandb, written["figure6_series"])}
    for key, png in (("figure6", Path(written["figure"])), ("figure7", report.parent / "figure7.png")):
        if png.exists():
            values[key] = wandb.Image(str(png))
    if responses:
        values[RESPONSES_TABLE_KEY] = wandb.Table(
            columns=["run", "net", "seed", "iterations", "layer", "std"],
            data=[[r["name"], r["net"], r["seed"], r["iterations"], i + 1, std]
                  for r in responses["runs"] for i, std in enumerate(r["stds"])])
    run.log(values)
    # a copy in the run's own files folder travels with it (wandb sync uploads that folder)
    for file in (report, responses_file):
        if file.exists():
            shutil.copyfile(file, Path(run.dir) / file.name)
    run.summary.update({"runs": sum(r["runs"] for r in rows), "nets": len(rows)})
    if responses:
        run.summary.update({f"mean_layer_std/{n['net']}-{n['iterations']}": n["mean_std"] for n in responses["nets"]})
    run.finish()
    return run.id
