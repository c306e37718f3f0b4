"""`resnetdist bench`: time the training step, in one process and one run, for two plain
PyTorch baselines and for this project's settings; `resnetdist bench loader`: images/s each
loader delivers, augmented, on the device. docs/benchmarks.md tells the baselines apart:
"baseline" (the speed-ups are against it) is a plain loop at its best, per-image transforms
written out in torch in DataLoader workers, non_blocking copies, the loss read back every
LOSS_READ_EVERY steps; "peer" (speedup_vs_peer) is a typical public script's loop, torchvision's
transforms on PIL images and loss.item() every step.

Every figure is measured after warm-up (compile and capture happen there: setup_s), with the
device synchronized around the timed loop; host_ms_per_iter is the host's time per step before
that final synchronization (in graph mode: launching the replay and feeding it). The JSON is
rewritten after every setting, so a run cut short keeps what it measured ("complete": false).
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..checkpoint import atomic_write_json
from ..config import PAPER_ITERS, ModelConfig, RunConfig, load_config, model_name
from ..data import open_loaders
from ..data.augment import augment
from ..data.cifar import Cifar10, Split, load_cifar10, write_synthetic
from ..data.feed import Feed
from ..models import build_model
from ..training import build, take_steps

BATCH = 128
LOSS_READ_EVERY = 100  # the baseline's progress-meter read-back (a host sync), as public loops log


@dataclass(frozen=True)
class Setting:
    loader: str  # resident | ffcv | baseline | peer
    mode: str  # eager | compile | graph (baselines: eager)
    precision: str  # fp32 | bf16 | fp16

    @property
    def label(self) -> str:
        if self.loader == "baseline":
            return "baseline: fp32 eager, CPU transforms in a DataLoader, loss read every 100 steps"
        if self.loader == "peer":  # which transforms run: peer_transform's
            how = "torchvision transforms" if has_torchvision() else "torchvision's transforms written out (not installed)"
            return f"peer baseline: fp32 eager, {how} in a DataLoader, loss.item() every step"
        return f"{self.loader} loader, {self.mode}, {self.precision}"


BASELINES = (Setting("baseline", "eager", "fp32"), Setting("peer", "eager", "fp32"))


def settings_for(device: torch.device, loaders: list[str], modes: list[str], precisions: list[str],
                 ffcv_available: bool) -> tuple[list[Setting], list[str]]:
    """The settings that can run here, and a note for each one left out."""
    cuda = device.type == "cuda"
    chosen, skipped = list(BASELINES), []
    for s in itertools.starmap(Setting, itertools.product(loaders, modes, precisions)):
        if s.loader == "ffcv" and not ffcv_available:
            skipped.append(f"{s.label}: FFCV is not installed")
        elif s.mode == "graph" and not cuda:
            skipped.append(f"{s.label}: CUDA graphs need a GPU")
        elif s.precision == "fp16" and (not cuda or s.mode == "graph"):
            skipped.append(f"{s.label}: fp16 runs on CUDA, without graphs")
        else:
            chosen.append(s)
    return chosen, skipped


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # what public scripts normalize by


def crop_flip_normalize(img: torch.Tensor, y: int, x: int, flip: bool, mean: torch.Tensor,
                        std: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding=4) (zero-pad 4, the 32x32 window at row y, column x),
    RandomHorizontalFlip (when `flip`), ToTensor (uint8 -> float in [0, 1]) and Normalize
    ((x - mean) / std) on one uint8 CHW image, written out in torch."""
    img = F.pad(img, (4, 4, 4, 4))[:, y : y + 32, x : x + 32]
    return ((img.flip(-1) if flip else img).float() / 255 - mean) / std


class PerImage(torch.utils.data.Dataset):
    """A baseline's dataset: (transform(uint8 CHW image), label), one image at a time on the CPU,
    in the DataLoader's workers, as public scripts transform."""

    def __init__(self, split: Split, transform: Callable[[np.ndarray], torch.Tensor]):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def baseline_transform(image: np.ndarray, mean=torch.tensor(CIFAR_MEAN)[:, None, None],
                       std=torch.tensor(CIFAR_STD)[:, None, None]) -> torch.Tensor:
    """The baseline's: crop_flip_normalize on the image as a tensor, no PIL, its three random
    numbers in two draws (the cheapest way: the baseline at its best)."""
    y, x = torch.randint(0, 9, (2,)).tolist()
    return crop_flip_normalize(torch.from_numpy(image), y, x, bool(torch.rand(()) < 0.5), mean, std)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setting: Setting, run, started: float, warmup: int, iters: int, device: torch.device) -> dict[str, Any]:
    """Time run(count) as `timed` does; setup_s: from `started` (perf_counter) to the end of the warm-up."""
    setup = time.perf_counter() - started
    warm_s, seconds, host_seconds = timed(run, warmup, iters, device)
    ms = 1000 * seconds / iters
    return {"setting": setting.label, "loader": setting.loader, "mode": setting.mode,
            "precision": setting.precision, "ms_per_iter": ms, "images_per_second": BATCH * iters / seconds,
            "projected_64k_s": ms * PAPER_ITERS / 1000, "setup_s": setup + warm_s, "iters": iters,
            "host_ms_per_iter": 1000 * host_seconds / iters}


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def peer_transform(mean: tuple = CIFAR_MEAN, std: tuple = CIFAR_STD) -> tuple[Callable, str]:
    """(the peer's transform of a uint8 CHW image: a PIL image, then torchvision's four transforms
    (without torchvision, _peer_transform_written_out), which implementation it is)."""
    if not has_torchvision():
        chain = partial(_peer_transform_written_out, mean=torch.tensor(mean)[:, None, None],
                        std=torch.tensor(std)[:, None, None])
        source = "written out in torch (torchvision not installed)"
    else:
        from torchvision import __version__ as tv_version, transforms as T

        chain = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        source = f"torchvision {tv_version}"
    return partial(_through_pil, chain=chain), source  # a partial: DataLoader workers may pickle it


def _through_pil(image: np.ndarray, chain: Callable) -> torch.Tensor:
    from PIL import Image  # Pillow: an optional dependency, as torchvision is

    return chain(Image.fromarray(image.transpose(1, 2, 0)))


def _peer_transform_written_out(img, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A PIL image (HWC) through crop_flip_normalize, the random numbers drawn as torchvision
    draws them: row, column, then the flip."""
    y, x = (int(torch.randint(0, 9, size=(1,)).item()) for _ in range(2))
    flip = bool(torch.rand(1) < 0.5)
    return crop_flip_normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1), y, x, flip, mean, std)


def baseline_settings(device: torch.device, workers: int, peer: bool = False, source: str = "") -> dict[str, Any]:
    """Put the baselines at their best on this device, and say how each ran. cudnn.benchmark is
    set here, before them, because every project setting gets it (trainer.make_model): a baseline
    without it would inflate the speed-ups. The peer loop differs where public scripts do:
    loss.item() every step, torchvision transforms on PIL images, blocking copies."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    return {"precision": "fp32", "step": "eager",
            "transforms": (f"torchvision-style on PIL images, per image, on the CPU: {source}" if peer
                           else "torchvision-style written out in torch, per image, on the CPU"),
            "dataloader_workers": workers, "pin_memory": on_cuda, "non_blocking": not peer,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if on_cuda else None,
            "optimizer": "torch.optim.SGD", "loss_read_every": 1 if peer else LOSS_READ_EVERY}


def bench_baseline(data: Cifar10, n: int, iters: int, warmup: int, device: torch.device, workers: int,
                   peer: bool = False) -> dict:
    setting = BASELINES[1] if peer else BASELINES[0]
    t_setup = time.perf_counter()
    transform, source = peer_transform() if peer else (baseline_transform, "")
    dataset, settings = PerImage(data.train, transform), baseline_settings(device, workers, peer, source)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=settings["pin_memory"], persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(n=n)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    it = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    every, non_blocking = settings["loss_read_every"], settings["non_blocking"]

    def steps(count: int) -> None:
        for i in range(count):
            x, y = next(it)
            x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % every == 0:
                loss.item()  # the progress meter's read-back (a host sync)

    return {**measure(setting, steps, t_setup, warmup, iters, device), "baseline_settings": settings}


def bench_config(setting: Setting, n: int, device: torch.device, beton_dir: Path) -> RunConfig:
    return load_config(flags={
        "model": {"n": n}, "data": {"loader": setting.loader, "beton_dir": str(beton_dir)},
        "train": {"device": device.type, "precision": setting.precision, "step": setting.mode},
        "log": {"wandb_mode": "disabled"},
    })


def stepping(trainer) -> Callable[[int], None]:
    """run(count): the trainer's next `count` training steps from iteration 0 on, as the loop takes them."""
    return partial(take_steps, trainer.step, trainer.feed.batches(0))


def timed(run, warmup: int, iters: int, device: torch.device) -> tuple[float, float, float]:
    """(seconds of the warm-up, seconds of `iters` timed iterations, host seconds of those
    iterations before the closing synchronization); run(count) does count."""
    t0 = time.perf_counter()
    run(warmup)
    sync(device)
    t1 = time.perf_counter()
    run(iters)
    t_host = time.perf_counter()
    sync(device)
    return t1 - t0, time.perf_counter() - t1, t_host - t1


def bench_setting(setting: Setting, data: Cifar10, n: int, iters: int, warmup: int, device: torch.device,
                  beton_dir: Path) -> dict:
    t_setup = time.perf_counter()
    cfg = bench_config(setting, n, device, beton_dir)
    trainer = build(cfg, dist.DistContext(0, 0, 1, device), data)
    # step: what ran, and why (step_reason: an auto graph whose capture failed runs eagerly)
    # feed: every loader's batches reach the step in the feed's device buffers (data/feed.py)
    return {**measure(setting, stepping(trainer), t_setup, warmup, iters, device), "step": trainer.step.kind,
            "feed": "device", "step_reason": trainer.step.choice.reason}


def bench_loader(loader_name: str, data: Cifar10, device: torch.device, beton_dir: Path, iters: int,
                 warmup: int) -> dict:
    """Images/s delivered by one loader, augmented on the device, with no model step."""
    cfg = bench_config(Setting(loader_name, "eager", "fp32"), 1, device, beton_dir)
    ctx = dist.DistContext(0, 0, 1, device)
    batches = Feed(open_loaders(cfg.data, data, ctx, BATCH, 0).train).batches(0)
    mean = torch.zeros(3, 32, 32, device=device)

    def augment_only(images, labels, aug):
        augment(images, mean, aug)

    _, seconds, _ = timed(lambda count: take_steps(augment_only, batches, count), warmup, iters, device)
    return {"loader": loader_name, "images_per_second": BATCH * iters / seconds, "iters": iters}


def environment(device: torch.device) -> dict[str, Any]:
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "threads": torch.get_num_threads()}


def ffcv_state() -> str:
    """"present", or why not (FFCV imports native libraries: find_spec is not enough)."""
    from ..data.beton import require_ffcv

    try:
        require_ffcv()
        return "present"
    except RuntimeError as e:
        return f"absent or broken ({type(e.__cause__).__name__ if e.__cause__ else 'import failed'})"


@contextmanager
def bench_data(data_dir: Path | None) -> Iterator[tuple[Cifar10, Path]]:
    """The data to time with (synthetic when no folder is given), and where its .beton files go."""
    with tempfile.TemporaryDirectory(prefix="resnetdist-bench-") as scratch:
        if data_dir is None:
            yield load_cifar10(write_synthetic(Path(scratch), 10_000, 1_000)), Path(scratch) / "beton"
        else:
            data = load_cifar10(data_dir)
            yield data, data.folder.parent / "beton"


def epoch_draw_ms() -> float:
    """Host ms to draw one 50,000-image epoch's augmentation numbers (data/augment.draw_block,
    what the feed's epoch-ahead thread builds per epoch), the median of 5."""
    from ..data.augment import draw_block

    iters, times = 50_000 // BATCH, []
    for epoch in range(5):
        t0 = time.perf_counter()
        draw_block(0, epoch * iters, iters, BATCH, 0, 1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run_step_bench(n: int, iters: int, warmup: int, device_pref: str, loaders: list[str], modes: list[str],
                   precisions: list[str], data_dir: Path | None, workers: int,
                   out: Path | None = None) -> dict[str, Any]:
    """Time each setting; with `out`, the report is written there after every setting."""
    device = dist.device_for(device_pref, 0)
    settings, skipped = settings_for(device, loaders, modes, precisions, ffcv_state() == "present")
    report = {"kind": "step", "model": model_name(n, plain=False), "batch": BATCH, **environment(device),
              "data": str(data_dir) if data_dir else "synthetic", "complete": False, "results": [],
              "skipped": skipped, "epoch_draw_ms": epoch_draw_ms()}
    with bench_data(data_dir) as (data, betons):
        for s in settings:
            print(f"  timing {s.label} ...", flush=True)
            if s.loader in ("baseline", "peer"):
                result = bench_baseline(data, n, iters, warmup, device, workers, peer=s.loader == "peer")
                report[s.loader] = result["baseline_settings"]
            else:
                result = bench_setting(s, data, n, iters, warmup, device, betons)
            report["results"].append(result)
            add_ratios(report["results"])
            write_report(report, out)
    report["complete"] = True
    write_report(report, out)
    return report


def add_ratios(results: list[dict[str, Any]]) -> None:
    """speedup_vs_baseline (the best plain loop) and speedup_vs_peer (the typical one) of each row."""
    ms = {r["loader"]: r["ms_per_iter"] for r in results if r["loader"] in ("baseline", "peer")}
    for r in results:
        r["speedup_vs_baseline"] = ms["baseline"] / r["ms_per_iter"] if "baseline" in ms else None
        r["speedup_vs_peer"] = ms["peer"] / r["ms_per_iter"] if "peer" in ms else None


def run_loader_bench(iters: int, warmup: int, device_pref: str, loaders: list[str], data_dir: Path | None) -> dict:
    device = dist.device_for(device_pref, 0)
    have_ffcv = ffcv_state() == "present"
    chosen = [name for name in loaders if name != "ffcv" or have_ffcv]
    skipped = [f"{name} loader: FFCV is not installed" for name in loaders if name not in chosen]
    with bench_data(data_dir) as (data, betons):
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
        rows = ["| setting | ms/iter | host ms/iter | images/s | 64k iters | vs baseline | vs peer | setup |",
                "|---|---|---|---|---|---|---|---|"]
        rows += [
            f"| {r['setting']} | {r['ms_per_iter']:.2f} | {r['host_ms_per_iter']:.2f} | "
            f"{r['images_per_second']:,.0f} | {r['projected_64k_s'] / 60:.1f} min | {_ratio(r['speedup_vs_baseline'])} | "
            f"{_ratio(r['speedup_vs_peer'])} | {r['setup_s']:.1f} s |"
            for r in report["results"]
        ]
    notes = [f"- skipped: {s}" for s in report["skipped"]]
    if report.get("epoch_draw_ms") is not None:  # the feed's host work per epoch
        notes.append(f"- augmentation draws of one epoch (390 iterations, host): {report['epoch_draw_ms']:.1f} ms")
    return "\n".join([head, "", *rows, *([""] + notes if notes else [])])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """The report so far as JSON in `out` (None: not written): after each setting, a cut keeps it."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
