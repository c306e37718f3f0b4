"""`resnetdist bench`: time the training step, in one process and one run, for a plain PyTorch
baseline and for this project's settings; `resnetdist bench loader`: images/s each loader
delivers, augmented, on the device.

The baseline is how public reproductions train: fp32, eager, torchvision-style per-image
transforms (pad, random crop, flip, to-tensor, normalize) in a multi-worker DataLoader,
torch.optim.SGD, and a loss.item() per step for the progress meter. torchvision itself is not
a dependency, so its three transforms are written out here exactly as they behave.

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

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .checkpoint import atomic_write_text
from .config import load_config
from .data.augment import augment, draw_params
from .data.cifar import Cifar10, Split, load_cifar10, write_batch_file, FOLDER, TRAIN_FILES, TEST_FILES
from .models import ModelConfig, build_model
from .train import Trainer
from .worker import ensure_betons

PAPER_ITERS = 64_000
BATCH = 128


@dataclass(frozen=True)
class Setting:
    loader: str  # gpu | ffcv | baseline
    mode: str  # eager | compile | graph (baseline: eager)
    precision: str  # fp32 | bf16 | fp16

    @property
    def label(self) -> str:
        if self.loader == "baseline":
            return "baseline: fp32 eager, CPU transforms in a DataLoader"
        return f"{self.loader} loader, {self.mode}, {self.precision}"


def synthetic_cifar(root: Path, train_per_file: int = 10_000, test: int = 1_000, seed: int = 0) -> Path:
    """Random pixels and labels in the official layout: speed does not depend on content."""
    rng = np.random.default_rng(seed)
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [*((f, train_per_file) for f in TRAIN_FILES), (TEST_FILES[0], test)]:
        split = Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
        write_batch_file(folder / name, split)
    return root


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(setting: Setting, iters: int, seconds: float, setup: float) -> dict[str, Any]:
    ms = 1000 * seconds / iters
    return {"setting": setting.label, "loader": setting.loader, "mode": setting.mode,
            "precision": setting.precision, "ms_per_iter": ms, "images_per_second": BATCH * iters / seconds,
            "projected_64k_s": ms * PAPER_ITERS / 1000, "setup_s": setup, "iters": iters}


def bench_baseline(data: Cifar10, n: int, iters: int, warmup: int, device: torch.device, workers: int) -> dict:
    setting = Setting("baseline", "eager", "fp32")
    t_setup = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        TorchvisionStyle(data.train), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(n=n)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step():
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    _sync(device)
    setup = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return _result(setting, iters, time.perf_counter() - t0, setup)


def make_trainer(setting: Setting, data: Cifar10, n: int, device: torch.device, betons: Path | None) -> Trainer:
    cfg = load_config(
        flags={"model": {"n": n}, "data": {"loader": setting.loader},
               "train": {"device": device.type, "precision": setting.precision, "cuda_graph": setting.mode == "graph",
                         "compile": "default" if setting.mode == "compile" else "none"}},
    )
    ctx = dist.DistContext(0, 0, 1, device)
    return Trainer(cfg, ctx, data, betons)


def bench_setting(setting: Setting, data: Cifar10, n: int, iters: int, warmup: int, device: torch.device,
                  betons: Path | None) -> dict:
    t_setup = time.perf_counter()
    trainer = make_trainer(setting, data, n, device, betons)
    step = trainer.build_step()
    batches = trainer.train_loader.batches(0)
    seed, gb = trainer.cfg.train.seed, trainer.global_batch

    def run(first: int, count: int) -> None:
        for i in range(first, first + count):
            images, labels = next(batches)
            step(images, labels, draw_params(seed, i, gb, 0, 1))

    run(0, warmup)
    _sync(device)
    setup = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    run(warmup, iters)
    _sync(device)
    result = _result(setting, iters, time.perf_counter() - t0, setup)
    trainer.stats.zero_()
    return result


def bench_loader(loader_name: str, data: Cifar10, device: torch.device, betons: Path | None, iters: int,
                 warmup: int) -> dict:
    """Images/s delivered by one loader, augmented on the device, with no model step."""
    trainer = make_trainer(Setting(loader_name, "eager", "fp32"), data, 1, device, betons)
    batches = trainer.train_loader.batches(0)
    gb = trainer.global_batch

    def run(first: int, count: int) -> None:
        for i in range(first, first + count):
            images, _ = next(batches)
            augment(images, trainer.mean, draw_params(0, i, gb, 0, 1).to(device, non_blocking=True))

    run(0, warmup)
    _sync(device)
    t0 = time.perf_counter()
    run(warmup, iters)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"loader": loader_name, "images_per_second": gb * iters / seconds, "iters": iters}


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
        from .data.beton import require_ffcv

        require_ffcv()
        return True
    except (ImportError, RuntimeError):
        return False


def open_data(data_dir: Path | None, scratch: Path, need_betons: bool) -> tuple[Cifar10, Path | None]:
    root = data_dir or synthetic_cifar(scratch)
    data = load_cifar10(root)
    betons = None
    if need_betons:
        cfg = load_config(flags={"data": {"loader": "ffcv", "beton_dir": str(scratch / "beton") if data_dir is None else ""}})
        betons = ensure_betons(cfg, data)
    return data, betons


def run_step_bench(n: int, iters: int, warmup: int, device_pref: str, loaders: list[str], modes: list[str],
                   precisions: list[str], data_dir: Path | None, workers: int) -> dict[str, Any]:
    device = dist.resolve_device(device_pref, 0)
    have_ffcv = ffcv_available()
    settings, skipped = settings_for(device, loaders, modes, precisions, have_ffcv)
    with tempfile.TemporaryDirectory(prefix="resnetdist-bench-") as scratch:
        data, betons = open_data(data_dir, Path(scratch), any(s.loader == "ffcv" for s in settings))
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
    return {"kind": "step", "model": f"resnet{6 * n + 2}", "batch": BATCH, **environment(device),
            "data": str(data_dir) if data_dir else "synthetic", "results": results, "skipped": skipped}


def run_loader_bench(iters: int, warmup: int, device_pref: str, loaders: list[str], data_dir: Path | None) -> dict:
    device = dist.resolve_device(device_pref, 0)
    have_ffcv = ffcv_available()
    chosen = [name for name in loaders if name != "ffcv" or have_ffcv]
    skipped = [f"{name} loader: FFCV is not installed" for name in loaders if name not in chosen]
    with tempfile.TemporaryDirectory(prefix="resnetdist-bench-") as scratch:
        data, betons = open_data(data_dir, Path(scratch), "ffcv" in chosen)
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
