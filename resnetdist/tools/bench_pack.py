"""`resnetdist bench --pack 1,2,4,8`: images/s of a pack of K seeds trained as one fused model
(pack.py) against the same K runs' steps taken one after another, and against one dense model
at batch 128*K (the ceiling: the same images per step through one un-grouped net).

All three run the training step of a run here (step.build_step: the step kind and precision a
run gets on this device, channels_last on CUDA as train.channels_last sets it), on synthetic
batches already on the device, so the figures are the step's and not a loader's. The three are
timed in turns, `rounds` times over, and each keeps its best round: load from other processes
(a shared machine) then skews the ratios less than it skews the absolute figures. The JSON is
rewritten after every K, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import dist
from ..config import ModelConfig, model_name
from ..pack import build_pack
from ..training import StepChoice, TensorLRSGD, TrainStep, build_step, choose_kind, default_precision
from .bench import BATCH, environment, sync, write_report

PACK_ROUNDS = 3  # each setting's best of 3 rounds, taken in turns


def pack_step(cfg: ModelConfig, seeds: list[int], inputs: tuple[torch.Tensor, ...], device: torch.device,
              choice: StepChoice, precision: str) -> TrainStep:
    """A training step of the pack of `seeds` (one seed: a single run's), as a run builds it; a
    graph captured with `inputs` (the synthetic batch it is then handed: no copy per replay)."""
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    # 4 stem channels per member only where they help: channels_last packs (models.CifarResNet)
    stem = 4 if layout == torch.channels_last and len(seeds) > 1 else 3
    model = build_pack(cfg, seeds, stem).to(device, memory_format=layout)
    optimizer = TensorLRSGD(model.parameters(), torch.zeros((), device=device), 0.9, 1e-4)
    mean = torch.full((3, 32, 32), 0.5, device=device)
    return build_step(model, optimizer, mean, torch.full((1,), 0.1), choice=choice, precision=precision,
                      memory_format=layout, inputs=inputs)


def synthetic_batch(members: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Images, labels and augmentation numbers of one step: a row per member for a pack."""
    lead = (batch,) if members == 1 else (members, batch)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (*lead, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, lead, generator=g)
    aug = torch.randint(0, 9, (*lead[:-1], 3, batch), generator=g)
    aug.select(-2, 2).remainder_(2)  # the flip row is 0/1
    return images.to(device), labels.to(device), aug.to(device)


def time_best(runs: dict[str, Callable[[int], None]], warmup: int, iters: int, rounds: int,
              device: torch.device) -> dict[str, float]:
    """Seconds per iteration of each run, its best of `rounds` rounds taken in turns."""
    for run in runs.values():
        run(warmup)
    sync(device)
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(iters)
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / iters)
    return best


def bench_one_k(cfg: ModelConfig, k: int, iters: int, warmup: int, rounds: int, device: torch.device,
                choice: StepChoice, precision: str) -> dict[str, Any]:
    seeds = list(range(k))
    pack_batch, single_batch, dense_batch = (synthetic_batch(k, BATCH, device), synthetic_batch(1, BATCH, device),
                                             synthetic_batch(1, BATCH * k, device))
    packed = pack_step(cfg, seeds, pack_batch, device, choice, precision)
    alone = [pack_step(cfg, [s], single_batch, device, choice, precision) for s in seeds]
    dense = pack_step(cfg, [0], dense_batch, device, choice, precision)

    def repeat(step_fns, batch):
        def run(count: int) -> None:
            for _ in range(count):
                for step in step_fns:
                    step(*batch)
        return run

    seconds = time_best({"pack": repeat([packed], pack_batch), "one_after_another": repeat(alone, single_batch),
                         "dense": repeat([dense], dense_batch)}, warmup, iters, rounds, device)
    images = k * BATCH
    ips = {name: images / s for name, s in seconds.items()}
    return {"k": k, "images_per_step": images, "step": packed.kind, "step_reason": packed.choice.reason,
            "ms_per_iter": {name: 1000 * s for name, s in seconds.items()},
            "images_per_second": ips, "pack_vs_one_after_another": ips["pack"] / ips["one_after_another"],
            "pack_vs_dense": ips["pack"] / ips["dense"]}


def run_pack_bench(n: int, ks: list[int], iters: int, warmup: int, rounds: int, device_pref: str,
                   out: Path | None = None) -> dict[str, Any]:
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--pack {','.join(map(str, ks))}: pack sizes are whole numbers >= 1")
    device = dist.device_for(device_pref, 0)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # as trainer.make_model sets it for a run
    precision = default_precision(on_cuda)
    choice = choose_kind("auto", on_cuda, precision)
    cfg = ModelConfig(n=n)
    report = {"kind": "pack", "model": model_name(n, plain=False), "batch_per_member": BATCH, "step": choice.kind,
              "precision": precision, "layout": "channels_last" if on_cuda else "NCHW", **environment(device),
              "rounds": rounds, "iters": iters, "complete": False, "results": []}
    for k in ks:
        print(f"  timing K = {k} ...", flush=True)
        report["results"].append(bench_one_k(cfg, k, iters, warmup, rounds, device, choice, precision))
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
