"""`resnetdist bench --pack 1,2,4,8`: images/s of a pack of K seeds trained as one fused model
(pack.py) against the same K runs' steps taken one after another, and against one dense model
at batch 128*K (the ceiling: the same images per step through one un-grouped net).

All three are built as `train` builds them (training.build: the step kind and precision a run
gets on this device, channels_last on CUDA as train.channels_last sets it, the resident feed),
on a synthetic training set already on the device, and timed as the training loop drives them
(take_steps). The three are timed in turns, `rounds` times over, and each keeps its best round:
load from other processes (a shared machine) then skews the ratios less than it skews the
absolute figures. The JSON is rewritten after every K, so a run cut short keeps what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .. import dist
from ..config import load_config, model_name
from ..data.cifar import Cifar10
from ..pack import member_configs
from ..training import build
from .bench import BATCH, bench_data, environment, stepping, timed, write_report

PACK_ROUNDS = 3  # each setting's best of 3 rounds, taken in turns


def pack_trainer(n: int, seeds: list[int], batch: int, device: torch.device, data: Cifar10):
    """The Trainer of the pack of `seeds` (one seed: a single run's) at `batch` images per
    member, built as `train --seeds` builds it."""
    cfg = load_config(flags={"model": {"n": n}, "optim": {"batch_size": batch},
                             "train": {"device": device.type}, "log": {"wandb_mode": "disabled"}})
    return build(cfg, dist.DistContext(0, 0, 1, device), data, members=member_configs(cfg, seeds))


def time_best(runs: dict[str, Callable[[int], None]], warmup: int, iters: int, rounds: int,
              device: torch.device) -> dict[str, float]:
    """Seconds per iteration of each run, its best of `rounds` rounds taken in turns, after all are warm."""
    for run in runs.values():
        run(warmup)
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run, 0, iters, device)[1] / iters)
    return best


def bench_one_k(n: int, k: int, iters: int, warmup: int, rounds: int, device: torch.device,
                data: Cifar10) -> dict[str, Any]:
    seeds = list(range(k))
    packed = pack_trainer(n, seeds, BATCH, device, data)
    dense = stepping(pack_trainer(n, [0], BATCH * k, device, data))
    alone = [stepping(pack_trainer(n, [s], BATCH, device, data)) for s in seeds]

    def one_after_another(count: int) -> None:
        for _ in range(count):
            for run in alone:
                run(1)

    seconds = time_best({"pack": stepping(packed), "one_after_another": one_after_another, "dense": dense},
                        warmup, iters, rounds, device)
    images = k * BATCH
    ips = {name: images / s for name, s in seconds.items()}
    step = packed.step
    return {"k": k, "images_per_step": images, "step": step.kind, "step_reason": step.choice.reason,
            "precision": packed.plan.precision, "ms_per_iter": {name: 1000 * s for name, s in seconds.items()},
            "images_per_second": ips, "pack_vs_one_after_another": ips["pack"] / ips["one_after_another"],
            "pack_vs_dense": ips["pack"] / ips["dense"]}


def run_pack_bench(n: int, ks: list[int], iters: int, warmup: int, rounds: int, device_pref: str,
                   out: Path | None = None) -> dict[str, Any]:
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--pack {','.join(map(str, ks))}: pack sizes are whole numbers >= 1")
    device = dist.device_for(device_pref, 0)
    report = {"kind": "pack", "model": model_name(n, plain=False), "batch_per_member": BATCH, "step": None,
              "precision": None, "layout": "channels_last" if device.type == "cuda" else "NCHW", **environment(device),
              "rounds": rounds, "iters": iters, "complete": False, "results": []}
    with bench_data(None) as (data, _):  # 10,000 synthetic images: a dense step of 128*8 fits 9 times
        for k in ks:
            print(f"  timing K = {k} ...", flush=True)
            result = bench_one_k(n, k, iters, warmup, rounds, device, data)
            report.update(step=result["step"], precision=result.pop("precision"))  # what a run here gets
            report["results"].append(result)
            write_report(report, out)
    report["complete"] = True
    write_report(report, out)
    return report


def format_pack_table(report: dict[str, Any]) -> str:
    head = (f"pack benchmark on {report['device']}, torch {report['torch']}, {report['date']}, {report['model']}, "
            f"{report['batch_per_member']} images per member, {report['step']} step, {report['precision']}, "
            f"{report['layout']}, best of {report['rounds']} rounds of {report['iters']}")
    rows = ["| K | pack img/s | K runs one after another img/s | dense batch 128*K img/s | pack / one after another | pack / dense |",
            "|---|---|---|---|---|---|"]
    for r in report["results"]:
        ips = r["images_per_second"]
        rows.append(f"| {r['k']} | {ips['pack']:,.0f} | {ips['one_after_another']:,.0f} | {ips['dense']:,.0f} | "
                    f"{r['pack_vs_one_after_another']:.2f}x | {r['pack_vs_dense']:.2f}x |")
    return "\n".join([head, "", *rows])
