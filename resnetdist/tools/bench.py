"""`resnetdist bench`: time the training step, in one process and one run, for a plain PyTorch
baseline and for this project's settings; `resnetdist bench loader`: images/s each loader
delivers, augmented, on the device.

The baseline is a public loop at its best: fp32, eager, torchvision-style per-image
transforms (pad, random crop, flip, to-tensor, normalize) in a multi-worker DataLoader with
pinned memory and non-blocking copies, cudnn.benchmark on (as every project setting has it),
torch.optim.SGD, and the loss read back only every LOSS_READ_EVERY steps. Its settings are
written into the JSON. torchvision itself is not a dependency, so its three transforms are
written out here exactly as they behave.

Every figure is measured after warm-up (compile and graph capture happen there and are
reported separately as setup_s), with the device synchronized around the timed loop.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import dist
from ..checkpoint import atomic_write_text
from ..config import LOADER_ALIASES, PAPER_ITERS, ModelConfig, RunConfig, load_config, model_name
from ..data import open_loaders
from ..data.augment import augment
from ..data.cifar import Cifar10, Split, load_cifar10, write_synthetic
from ..train.loop import Feed, run_steps
from ..models import build_model
from ..train.resolve import resolve
from ..train.trainer import build

BATCH = 128
LOSS_READ_EVERY = 100  # the baseline's progress-meter read-back (a host sync), as public loops log


@dataclass(frozen=True)
class Setting:
    loader: str  # resident | ffcv | baseline
    mode: str  # eager | compile | graph (baseline: eager)
    precision: str  # fp32 | bf16 | fp16

    @property
    def label(self) -> str:
        if self.loader == "baseline":
            return "baseline: fp32 eager, CPU transforms in a DataLoader"
        return f"{self.loader} loader, {self.mode}, {self.precision}"


def settings_for(device: torch.device, loaders: list[str], modes: list[str], precisions: list[str],
                 ffcv_available: bool) -> tuple[list[Setting], list[str]]:
    """The settings that can run here, and a note for each one left out."""
    chosen, skipped = [Setting("baseline", "eager", "fp32")], []
    for loader in loaders:
        for mode in modes:
            for precision in precisions:
                s = Setting(loader, mode, precision)
                if loader == "ffcv" and not ffcv_available:
                    skipped.append(f"{s.label}: FFCV is not installed")
                elif mode == "graph" and device.type != "cuda":
                    skipped.append(f"{s.label}: CUDA graphs need a GPU")
                elif precision == "fp16" and (device.type != "cuda" or mode == "graph"):
                    skipped.append(f"{s.label}: fp16 runs on CUDA, without graphs")
                else:
                    chosen.append(s)
    return chosen, skipped


class TorchvisionStyle(torch.utils.data.Dataset):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, per image, on
    the CPU, as torchvision applies them."""

    MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    STD = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]

    def __init__(self, split: Split):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.images[i])
        padded = F.pad(img, (4, 4, 4, 4))
        y, x = torch.randint(0, 9, (2,)).tolist()
        img = padded[:, y : y + 32, x : x + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img.float() / 255 - self.MEAN) / self.STD, int(self.labels[i])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(setting: Setting, iters: int, seconds: float, setup: float) -> dict[str, Any]:
    ms = 1000 * seconds / iters
    return {"setting": setting.label, "loader": setting.loader, "mode": setting.mode,
            "precision": setting.precision, "ms_per_iter": ms, "images_per_second": BATCH * iters / seconds,
            "projected_64k_s": ms * PAPER_ITERS / 1000, "setup_s": setup, "iters": iters}


def baseline_settings(device: torch.device, workers: int) -> dict[str, Any]:
    """Put the baseline at its best on this device, and say how it ran. cudnn.benchmark is set
    here, before the baseline, because every project setting gets it (trainer.make_model): a
    baseline without it would inflate the speed-ups."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    return {"precision": "fp32", "step": "eager", "transforms": "torchvision-style, per image, on the CPU",
            "dataloader_workers": workers, "pin_memory": on_cuda, "non_blocking": True,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if on_cuda else None,
            "optimizer": "torch.optim.SGD", "loss_read_every": LOSS_READ_EVERY}


def bench_baseline(data: Cifar10, n: int, iters: int, warmup: int, device: torch.device, workers: int) -> dict:
    setting = Setting("baseline", "eager", "fp32")
    t_setup = time.perf_counter()
    settings = baseline_settings(device, workers)
    loader = torch.utils.data.DataLoader(
        TorchvisionStyle(data.train), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=settings["pin_memory"], persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(n=n)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def batches():
        while True:
            yield from loader

    it = batches()

    def steps(count: int) -> None:
        for i in range(count):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % LOSS_READ_EVERY == 0:
                loss.item()  # the progress meter's read-back

    setup = time.perf_counter() - t_setup
    warm_s, seconds = timed(steps, warmup, iters, device)
    return {**_result(setting, iters, seconds, setup + warm_s), "baseline_settings": settings}


def bench_config(setting: Setting, n: int, device: torch.device, beton_dir: Path) -> RunConfig:
    return resolve(load_config(flags={
        "model": {"n": n}, "data": {"loader": setting.loader, "beton_dir": str(beton_dir)},
        "train": {"device": device.type, "precision": setting.precision, "step": setting.mode},
        "log": {"wandb_mode": "disabled"},
    }))


def timed(run, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the warm-up, seconds of `iters` timed iterations); run(count) does count."""
    t0 = time.perf_counter()
    run(warmup)
    sync(device)
    t1 = time.perf_counter()
    run(iters)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def bench_setting(setting: Setting, data: Cifar10, n: int, iters: int, warmup: int, device: torch.device,
                  beton_dir: Path) -> dict:
    t_setup = time.perf_counter()
    cfg = bench_config(setting, n, device, beton_dir)
    trainer = build(cfg, dist.DistContext(0, 0, 1, device), data)
    step, batches = trainer.step, trainer.feed.batches(0)
    setup = time.perf_counter() - t_setup
    warm_s, seconds = timed(lambda count: run_steps(step, batches, count), warmup, iters, device)
    # step: what ran (a failed capture runs eagerly, and says so in capture_error)
    return {**_result(setting, iters, seconds, setup + warm_s), "step": step.kind, "capture_error": step.capture_error}


def bench_loader(loader_name: str, data: Cifar10, device: torch.device, beton_dir: Path, iters: int,
                 warmup: int) -> dict:
    """Images/s delivered by one loader, augmented on the device, with no model step."""
    cfg = bench_config(Setting(loader_name, "eager", "fp32"), 1, device, beton_dir)
    ctx = dist.DistContext(0, 0, 1, device)
    batches = Feed(open_loaders(cfg.data, data, ctx, BATCH, 0).train, 0, BATCH).batches(0)
    mean = torch.zeros(3, 32, 32, device=device)

    def augment_only(images, labels, aug):
        augment(images, mean, aug.to(device, non_blocking=True))

    _, seconds = timed(lambda count: run_steps(augment_only, batches, count), warmup, iters, device)
    return {"loader": loader_name, "images_per_second": BATCH * iters / seconds, "iters": iters}


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
    }


def ffcv_available() -> bool:
    try:
        from ..data.beton import require_ffcv

        require_ffcv()
        return True
    except (ImportError, RuntimeError):
        return False


def open_data(data_dir: Path | None, scratch: Path) -> tuple[Cifar10, Path]:
    """The data to time with (synthetic when no folder is given), and where its .beton files go."""
    if data_dir is None:
        return load_cifar10(write_synthetic(scratch, 10_000, 1_000)), scratch / "beton"
    data = load_cifar10(data_dir)
    return data, data.folder.parent / "beton"


def loader_names(loaders: list[str]) -> list[str]:
    return [LOADER_ALIASES.get(name, name) for name in loaders]


def run_step_bench(n: int, iters: int, warmup: int, device_pref: str, loaders: list[str], modes: list[str],
                   precisions: list[str], data_dir: Path | None, workers: int) -> dict[str, Any]:
    device = dist.resolve_device(device_pref, 0)
    have_ffcv = ffcv_available()
    settings, skipped = settings_for(device, loader_names(loaders), modes, precisions, have_ffcv)
    with tempfile.TemporaryDirectory(prefix="resnetdist-bench-") as scratch:
        data, betons = open_data(data_dir, Path(scratch))
        results = []
        for s in settings:
            print(f"  timing {s.label} ...", flush=True)
            if s.loader == "baseline":
                results.append(bench_baseline(data, n, iters, warmup, device, workers))
            else:
                results.append(bench_setting(s, data, n, iters, warmup, device, betons))
    base = results[0]["ms_per_iter"]
    for r in results:
        r["speedup_vs_baseline"] = base / r["ms_per_iter"]
    return {"kind": "step", "model": model_name(n, plain=False), "batch": BATCH, **environment(device),
            "baseline": results[0]["baseline_settings"],
            "data": str(data_dir) if data_dir else "synthetic", "results": results, "skipped": skipped}


def run_loader_bench(iters: int, warmup: int, device_pref: str, loaders: list[str], data_dir: Path | None) -> dict:
    device = dist.resolve_device(device_pref, 0)
    have_ffcv = ffcv_available()
    loaders = loader_names(loaders)
    chosen = [name for name in loaders if name != "ffcv" or have_ffcv]
    skipped = [f"{name} loader: FFCV is not installed" for name in loaders if name not in chosen]
    with tempfile.TemporaryDirectory(prefix="resnetdist-bench-") as scratch:
        data, betons = open_data(data_dir, Path(scratch))
        results = [bench_loader(name, data, device, betons, iters, warmup) for name in chosen]
    return {"kind": "loader", "batch": BATCH, **environment(device), "data": str(data_dir) if data_dir else "synthetic",
            "results": results, "skipped": skipped}


def format_table(report: dict[str, Any]) -> str:
    head = f"{report['kind']} benchmark on {report['device']}, torch {report['torch']}, {report['date']}"
    if report["kind"] == "loader":
        rows = ["| loader | images/s (augmented, on the device) |", "|---|---|"]
        rows += [f"| {r['loader']} | {r['images_per_second']:,.0f} |" for r in report["results"]]
    else:
        head += f", {report['model']}, batch {report['batch']}"
        rows = ["| setting | ms/iter | images/s | 64k iters | speed-up | setup |", "|---|---|---|---|---|---|"]
        rows += [
            f"| {r['setting']} | {r['ms_per_iter']:.2f} | {r['images_per_second']:,.0f} | "
            f"{r['projected_64k_s'] / 60:.1f} min | {r['speedup_vs_baseline']:.2f}x | {r['setup_s']:.1f} s |"
            for r in report["results"]
        ]
    notes = [f"- skipped: {s}" for s in report["skipped"]]
    return "\n".join([head, "", *rows, *([""] + notes if notes else [])])


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
