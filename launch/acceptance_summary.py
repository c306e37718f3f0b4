"""The summary of launch/gpu-acceptance.sh: reads OUT_DIR/stages.tsv and what the stages wrote,
writes OUT_DIR/summary.json, prints one table, exits 1 when a stage failed or timed out.
Standard library only (it runs where resnetdist's own imports might be what failed).

usage: python launch/acceptance_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the targets (benchmarks on one H100, not tests)
TARGETS = {"resnet20_train_seconds_max": 100.0, "resnet20_speedup_min": 6.7, "resnet20_standin_error_max": 12.4,
           "resnet56_projected_seconds_max": 300.0}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_json_object(path: Path):
    """The last line of a file that is a whole JSON object: a JSONL file's last complete record
    (a killed writer may leave half a line), or a log's result line (`resnetdist eval --json`
    after any note lines)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def first_json_object(path: Path):
    """The JSON object a log holds after any note lines (doctor --json)."""
    try:
        text = path.read_text(errors="replace")
        return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
    except (OSError, ValueError):
        return None


def bench_metrics(report) -> dict:
    """Each measured setting's figures against both baselines ("baseline": the best plain loop,
    "peer": the typical public one); older reports have the baseline alone, first."""
    if not report or not report.get("results"):
        return {}
    results = report["results"]
    by_loader = {r.get("loader"): r for r in results}
    base = by_loader.get("baseline", results[0])
    out = {"baseline_ms": base["ms_per_iter"], "complete": report.get("complete")}
    if "peer" in by_loader:
        out["peer_baseline_ms"] = by_loader["peer"]["ms_per_iter"]
    for r in results:
        if r is base or r.get("loader") == "peer":
            continue
        key = f"{r['mode']}_{r['precision']}"
        out[f"{key}_ms"] = r["ms_per_iter"]
        out[f"{key}_speedup"] = r["speedup_vs_baseline"]
        out[f"{key}_speedup_vs_peer"] = r.get("speedup_vs_peer")
        out[f"{key}_projected_64k_s"] = r["projected_64k_s"]
        out[f"{key}_host_ms"] = r.get("host_ms_per_iter")
        out[f"{key}_step"] = r.get("step")
    out["settings"] = [r["setting"] for r in results]
    return out


def targets(metrics: dict) -> dict:
    train, n3, n9 = metrics.get("train") or {}, metrics.get("bench_n3") or {}, metrics.get("bench_n9") or {}
    n3 = {**n3, **(metrics.get("bench_compile") or {})}  # compile's settings are ResNet-20's too
    speedup = max([v for k, v in n3.items() if k.endswith("_speedup") and v is not None], default=None)
    r56 = min([v for k, v in n9.items() if k.endswith("_projected_64k_s") and v is not None], default=None)
    checks = {
        "resnet20_train_seconds": (train.get("train_seconds"), lambda v: v <= TARGETS["resnet20_train_seconds_max"]),
        "resnet20_best_speedup_vs_baseline": (speedup, lambda v: v >= TARGETS["resnet20_speedup_min"]),
        "resnet20_standin_test_error": (train.get("test_error"), lambda v: v <= TARGETS["resnet20_standin_error_max"]),
        "resnet56_best_projected_64k_s": (r56, lambda v: v <= TARGETS["resnet56_projected_seconds_max"]),
    }
    return {name: {"value": v, "met": (ok(v) if v is not None else None)} for name, (v, ok) in checks.items()}


# the JSON each bench stage writes (after every setting it measured)
BENCH_JSON = {"bench-n3": "bench-n3.json", "bench-n9": "bench-n9.json", "bench-loader": "bench-loader.json",
              "compile": "bench-compile.json"}


def passed(status: str) -> bool:
    """ok; skipped for a missing package (not for want of time); or the compile stage cut at its
    limit ("cut at N s": a cold compile's length is reported, not failed)."""
    return (status == "ok" or status.startswith("cut at")
            or (status.startswith("skipped") and "deadline" not in status))


def stage_progress(out: Path, name: str, status: str):
    """How far a stage cut short got: the training's last metrics.jsonl record, or the bench
    settings already measured (bench writes its JSON after each one)."""
    if status == "ok" or status.startswith("skipped"):
        return None
    if name == "train-resnet20":
        return {"last_metrics_record": last_json_object(out / "resnet20" / "metrics.jsonl")}
    if name in BENCH_JSON:
        report = read_json(out / BENCH_JSON[name])
        return {"measured": [r["setting"] for r in report["results"]] if report else []}
    return None


def read_stages(out: Path) -> list[dict]:
    """stages.tsv: name, status, seconds, exit code and (newer scripts) the limit it ran under."""
    stages = []
    tsv = out / "stages.tsv"
    for line in (tsv.read_text().splitlines() if tsv.exists() else []):
        name, status, seconds, rc, *rest = line.split("\t")
        stages.append({"stage": name, "status": status, "seconds": int(seconds), "exit_code": int(rc),
                       "limit_s": int(rest[0]) if rest else None, "log": str(out / "logs" / f"{name}.log"),
                       "progress": stage_progress(out, name, status)})
    return stages


def describe(progress) -> str:
    if not progress:
        return ""
    if "measured" in progress:
        return "measured: " + (", ".join(progress["measured"]) or "nothing")
    record = progress["last_metrics_record"]
    return f"last record: iteration {record.get('iter')}" if record else "no metrics record"


def main(out: Path) -> int:
    stages = read_stages(out)
    train = read_json(out / "resnet20" / "summary.json")
    evaluated = last_json_object(out / "logs" / "eval-resnet20.log")
    doctor = first_json_object(out / "logs" / "doctor.log")
    metrics = {"train": train, "eval": evaluated,
               "eval_matches_summary": (evaluated["test_error"] == train["test_error"]) if train and evaluated else None,
               "bench_n3": bench_metrics(read_json(out / "bench-n3.json")),
               "bench_n9": bench_metrics(read_json(out / "bench-n9.json")),
               "bench_compile": bench_metrics(read_json(out / "bench-compile.json")),
               "doctor_failed": [c["name"] for c in doctor["checks"] if c["status"] == "fail"] if doctor else None}
    ok = all(passed(s["status"]) for s in stages)
    summary = {"ok": ok, "stages": stages, "total_seconds": sum(s["seconds"] for s in stages), "metrics": metrics,
               "targets": targets(metrics)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| stage | status | s | how far |\n|---|---|---|---|")
    for s in stages:
        print(f"| {s['stage']} | {s['status']} | {s['seconds']} | {describe(s['progress'])} |")
    print(f"| total | {'ok' if ok else 'FAILED'} | {summary['total_seconds']} |\n\n| target | value | met |\n|---|---|---|")
    for name, t in summary["targets"].items():
        print(f"| {name} | {t['value'] if t['value'] is None else round(t['value'], 3)} | {t['met']} |")
    print(f"\neval of model.pt equals summary.json: {metrics['eval_matches_summary']}\nwrote {out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
