"""The paper's training loop, counted in iterations: SGD, lr 0.1 divided by 10 at 32k and 48k,
stop at 64k. One worker per rank; rank 0 writes everything.

The step (augment, forward, backward, SGD update, metric accumulation) reads its lr from a
per-iteration table on the device and counts iterations on the device, so the host only feeds
a batch and its augmentation numbers. That keeps the step identical whether it runs eagerly,
compiled, or replayed as one CUDA graph (train.cuda_graph), and the schedule needs no
re-capture. Loss and error sums stay on the device until the next log point.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, dist
from .data.augment import augment, draw_params, normalize, training_mean
from .data.cifar import Cifar10
from .data.loaders import make_eval_loader, make_train_loader
from .data.order import iters_per_epoch
from .metrics import NullLogger, open_logger
from .models import build_model, count_parameters
from .optim import TensorLRSGD
from .progress import progress_bar

if TYPE_CHECKING:
    from .config import RunConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "max-autotune")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OptimConfig:
    batch_size: int = 128  # global batch (see dist.batch_scaling)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    iters: int = 64_000
    milestones: list[int] = field(default_factory=lambda: [32_000, 48_000])
    gamma: float = 0.1  # lr factor at each milestone
    warmup_iters: int = -1  # lr = warmup_lr for the first warmup_iters; -1: 400 for n >= 18, else 0
    warmup_lr: float = 0.01

    def validate(self) -> None:
        if self.batch_size < 1 or self.iters < 1:
            raise ValueError("optim.batch_size and optim.iters must be >= 1")
        if self.lr <= 0 or self.warmup_lr <= 0:
            raise ValueError(f"optim.lr and optim.warmup_lr must be > 0, got {self.lr}, {self.warmup_lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ValueError("optim.momentum must be in [0, 1), weight_decay >= 0, gamma in (0, 1]")
        if sorted(self.milestones) != self.milestones or any(m < 1 for m in self.milestones):
            raise ValueError(f"optim.milestones must be increasing positive iterations, got {self.milestones}")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # run directory; "" = runs/<name>
    eval_every: int = 2_000
    checkpoint_every: int = 4_000
    keep_checkpoints: int = 3
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    channels_last: bool = True  # used on CUDA only
    compile: str = "none"  # none | default | max-autotune (torch.compile of the model)
    cuda_graph: bool = False  # capture the whole step once, replay it

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if min(self.eval_every, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise ValueError("train.eval_every, checkpoint_every and keep_checkpoints must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.cuda_graph and self.precision == "fp16":
            raise ValueError("train.cuda_graph does not support fp16 (its loss scaler syncs with the host); use bf16")


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(optim: OptimConfig, it: int, world_scale: float = 1.0, scale_warmup: int = 0) -> float:
    """Learning rate of iteration `it` (0-based). world_scale > 1 is the linear scaling rule
    for a global batch grown with the world size, reached by a linear ramp over scale_warmup."""
    if it < optim.warmup_iters:
        return optim.warmup_lr
    base = optim.lr
    if world_scale != 1.0:
        ramp = min(1.0, (it + 1) / scale_warmup) if scale_warmup else 1.0
        base = optim.lr * (1 + (world_scale - 1) * ramp)
    return base * optim.gamma ** sum(it >= m for m in optim.milestones)


def lr_table(cfg: RunConfig, world_size: int) -> torch.Tensor:
    scale = world_size if cfg.dist.batch_scaling == "per_rank" else 1
    return torch.tensor(
        [lr_at(cfg.optim, i, scale, cfg.dist.scale_warmup_iters) for i in range(cfg.optim.iters)],
        dtype=torch.float32,
    )


def global_batch(cfg: RunConfig, world_size: int) -> int:
    if cfg.dist.batch_scaling == "per_rank":
        return cfg.optim.batch_size * world_size
    if cfg.optim.batch_size % world_size:
        raise ValueError(
            f"optim.batch_size={cfg.optim.batch_size} does not divide across {world_size} ranks; "
            f"choose a multiple of {world_size} or set dist.batch_scaling=per_rank"
        )
    return cfg.optim.batch_size


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    # no cast cache: a cache filled during CUDA-graph capture would hold stale casts on replay
    # (PyTorch's graph notes), and each weight is cast once per step here anyway
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=False)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    """Everything one rank needs for one run. Built by `Trainer.setup`, driven by `fit`."""

    def __init__(self, cfg: RunConfig, ctx: dist.DistContext, data: Cifar10, beton_dir: Path | None = None):
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.device = ctx.device
        self.run_dir = cfg.run_dir
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.global_batch = global_batch(cfg, ctx.world_size)
        self.steps_per_epoch = iters_per_epoch(len(data.train), self.global_batch)
        self.memory_format = (
            torch.channels_last if cfg.train.channels_last and self.device.type == "cuda" else torch.contiguous_format
        )

        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        seed_everything(cfg.train.seed)  # same initial weights on every rank
        self.model = build_model(cfg.model).to(self.device, memory_format=self.memory_format)
        if cfg.dist.sync_bn and ctx.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.num_params = count_parameters(self.model)

        # device-side state the step reads and writes (static addresses, for graph capture)
        self.lr_host = lr_table(cfg, ctx.world_size)
        self.lrs = self.lr_host.to(self.device)
        self.lr = torch.zeros((), device=self.device)
        self.it = torch.zeros((), dtype=torch.long, device=self.device)
        self.stats = torch.zeros(3, device=self.device)  # loss sum, wrong count, sample count
        self.bad_iter = torch.full((), -1, dtype=torch.long, device=self.device)

        self.optimizer = TensorLRSGD(
            self.model.parameters(), self.lr, cfg.optim.momentum, cfg.optim.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
        self.mean = mean.to(self.device)

        beton_train = beton_test = None
        if cfg.data.loader == "ffcv":
            from .data.beton import beton_paths

            beton_train, beton_test = beton_paths(beton_dir)
        self.train_loader = make_train_loader(
            cfg.data, data.train, data.train_indices, beton_train, self.global_batch,
            cfg.train.seed, ctx.rank, ctx.world_size, self.device,
        )
        self.eval_loaders = {"test": make_eval_loader(cfg.data, data.test, None, beton_test, ctx.rank, ctx.world_size, self.device)}
        if data.val is not None:
            self.eval_loaders["val"] = make_eval_loader(
                cfg.data, data.val, data.val_indices, beton_train, ctx.rank, ctx.world_size, self.device
            )

        # train-window sums since the last evaluation (host side), and timing
        self.window = np.zeros(3)
        self.train_seconds = 0.0
        self.start_iter = 0
        self.wandb_id: str | None = None
        self.logger = NullLogger()
        self.step_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    # ----- the step -------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.precision, self.device)

    def build_step(self) -> Callable:
        graphed = self.cfg.train.cuda_graph and self.device.type == "cuda"
        train_model: nn.Module = self.model
        if self.ctx.distributed:
            # a backward captured in a graph needs DDP built on a side stream (PyTorch's CUDA
            # graphs notes, "Usage with DistributedDataParallel")
            with torch.cuda.stream(torch.cuda.Stream()) if graphed else nullcontext():
                train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile != "none":
            mode = None if self.cfg.train.compile == "default" else "max-autotune"
            if mode and self.cfg.train.cuda_graph:
                mode = "max-autotune-no-cudagraphs"  # our own graph captures the whole step
            train_model = torch.compile(train_model, mode=mode)

        def step(images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
            # index_select, not lrs[it]: a 0-d index tensor would be read back to the host
            self.lr.copy_(self.lrs.index_select(0, self.it.clamp(max=len(self.lrs) - 1).view(1)).squeeze(0))
            x = augment(images_u8, self.mean, aug).contiguous(memory_format=self.memory_format)
            with self._autocast():
                logits = train_model(x)
                loss = F.cross_entropy(logits, labels)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                loss = loss.detach().float()
                wrong = (logits.argmax(1) != labels).sum()
                n = labels.numel()
                self.stats.add_(torch.stack([loss * n, wrong.float(), torch.full_like(loss, n)]))
                first_bad = (self.bad_iter < 0) & ~torch.isfinite(loss)
                self.bad_iter.copy_(torch.where(first_bad, self.it, self.bad_iter))
                self.it.add_(1)

        if self.cfg.train.cuda_graph and not graphed:
            dist.print0(f"note: train.cuda_graph needs CUDA; running the step without a graph on {self.device}")
        if not graphed:
            def eager_step(images_u8, labels, aug):
                step(images_u8, labels, aug.to(self.device, non_blocking=True))
                self.optimizer.zero_grad(set_to_none=True)

            return eager_step
        return self._capture(step)

    def _capture(self, step: Callable) -> Callable:
        """Record the whole step as one CUDA graph. Warm-up steps (needed before capture, and
        by DDP) change weights, optimizer state and BN statistics, so those are restored in
        place afterwards: the graph keeps pointing at the same tensors."""
        b = self.global_batch // self.ctx.world_size
        static_x = torch.zeros((b, 3, 32, 32), dtype=torch.uint8, device=self.device)
        static_y = torch.zeros(b, dtype=torch.long, device=self.device)
        static_aug = torch.zeros((3, b), dtype=torch.long, device=self.device)
        keep = list(self.model.state_dict().values()) + [
            s["momentum_buffer"] for s in self.optimizer.state.values()
        ] + [self.it, self.stats, self.bad_iter]
        saved = [t.detach().clone() for t in keep]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(11):  # DDP needs 11 warm-up iterations before capture
                self.optimizer.zero_grad(set_to_none=True)
                step(static_x, static_y, static_aug)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static_x, static_y, static_aug)
        with torch.no_grad():
            for t, s in zip(keep, saved):
                t.copy_(s)

        def replay(images_u8, labels, aug):
            static_x.copy_(images_u8, non_blocking=True)
            static_y.copy_(labels, non_blocking=True)
            static_aug.copy_(aug, non_blocking=True)
            graph.replay()

        return replay

    # ----- evaluation, logging, checkpoints ------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return error_rates(self.model, self.eval_loaders, self.mean, self.memory_format, self._autocast)

    def drain_stats(self, it: int) -> dict[str, float]:
        """Move the device-side sums into the host window; stop on a non-finite loss."""
        stats = dist.all_reduce_sum(self.stats.clone()).cpu().numpy().astype(np.float64)
        self.stats.zero_()
        bad = int(self.bad_iter.item())
        # a non-finite loss on any rank makes the all-reduced loss sum non-finite on every rank
        if bad >= 0 or not math.isfinite(stats[0]):
            raise NonFiniteLoss(
                f"loss became NaN or inf at iteration {max(bad, 0) + 1} (checked at {it}); "
                f"the last good checkpoint in {self.run_dir} is kept. Try a lower optim.lr or train.precision=fp32"
            )
        self.window += stats
        count = max(stats[2], 1)
        return {"iter": it, "train_loss": stats[0] / count, "train_error": 100.0 * stats[1] / count,
                "lr": float(self.lr_host[it - 1])}

    def state_dict(self, it: int) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": it,
            "config": self.cfg.to_dict(),
            "mean": self.mean.cpu(),  # the preprocessing mean image, for export / inference
            "rng_cpu": torch.get_rng_state(),
            "train_window": torch.from_numpy(self.window.copy()),
            "train_seconds": self.train_seconds,
            "world_size": self.ctx.world_size,
            "wandb_id": self.wandb_id or "",
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # load_state_dict replaces the buffers; re-tie lr to the device tensor the step writes
        self.optimizer.lr = self.lr
        self.start_iter = int(state["iteration"])
        self.it.fill_(self.start_iter)
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.window = state["train_window"].numpy().astype(np.float64)
        self.train_seconds = float(state["train_seconds"])
        self.wandb_id = state.get("wandb_id") or None

    def resume(self) -> None:
        """Continue from the newest readable checkpoint in the run directory, if any. Rank 0
        picks it, so every rank resumes from the same file."""
        found = checkpoint.load_latest(self.run_dir, warn=dist.print0) if self.ctx.is_main else None
        path = dist.broadcast_object(str(found[0]) if found else None)
        if path is None:
            return
        state = found[1] if found else checkpoint.load(Path(path))
        self.load_state_dict(state)
        dist.print0(f"resuming from {path} (iteration {self.start_iter})")

    def save_checkpoint(self, it: int) -> None:
        if self.ctx.is_main:
            checkpoint.save(self.run_dir, it, self.state_dict(it), self.cfg.train.keep_checkpoints)
        dist.barrier()

    # ----- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.optim.iters
        self.resume()
        if self.ctx.is_main:
            self.logger = open_logger(
                cfg.log, self.run_dir, cfg.to_dict(), cfg.name, cfg.model.name,
                [cfg.model.name, "plain" if cfg.model.plain else "resnet", f"seed{cfg.train.seed}", f"depth{cfg.model.depth}"],
                self.start_iter, self.wandb_id,
            )
            self.wandb_id = self.logger.wandb_id
        try:
            summary = self._loop(total)
        except BaseException:
            self.logger.close(exit_code=1)
            raise
        self.logger.close()
        return summary

    def _loop(self, total: int) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        self.step_fn = self.build_step()
        self.model.train()
        kill_at = _test_kill_iteration()
        it = self.start_iter
        bar = progress_bar(f"{cfg.name}", total=total, enabled=ctx.is_main)
        bar.update(it)
        resumed_seconds = self.train_seconds  # img/s on the bar counts this attempt only
        batches = self.train_loader.batches(it)
        t0 = time.perf_counter()
        while it < total:
            images, labels = next(batches)
            self.step_fn(images, labels, draw_params(cfg.train.seed, it, self.global_batch, ctx.rank, ctx.world_size))
            it += 1
            if it == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            bar.update(1)
            log_now = it % cfg.log.log_every == 0
            eval_now = it % cfg.train.eval_every == 0 or it == total
            ckpt_now = it % cfg.train.checkpoint_every == 0 or it == total
            if not (log_now or eval_now or ckpt_now):
                continue
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_seconds += time.perf_counter() - t0
            record = self.drain_stats(it)
            self.logger.log(record, kind="train")
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", err=f"{record['train_error']:.1f}%",
                            img_s=f"{(it - self.start_iter) * self.global_batch / max(self.train_seconds - resumed_seconds, 1e-9):.0f}")
            if eval_now:
                self.log_evaluation(it)
            if ckpt_now:
                self.save_checkpoint(it)
            t0 = time.perf_counter()
        bar.close()
        return self.finish(total)

    def log_evaluation(self, it: int) -> None:
        errors = self.evaluate()
        loss_sum, wrong, count = self.window
        record = {
            "iter": it,
            "epoch": it / self.steps_per_epoch,
            "lr": float(self.lr_host[it - 1]),
            "train_loss": loss_sum / max(count, 1),
            "train_error": 100.0 * wrong / max(count, 1),
            **errors,
            "images_per_second": it * self.global_batch / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds,
        }
        self.window[:] = 0
        self.logger.log(record, kind="eval")
        self.last_record = record
        dist.print0(
            f"iter {it:>6}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f}  "
            f"train err {record['train_error']:.2f}%  " + "  ".join(f"{k} {v:.2f}%" for k, v in errors.items())
        )

    def finish(self, total: int) -> dict[str, Any]:
        record = getattr(self, "last_record", None)
        if record is None or record["iter"] != total:  # resumed at the very end: evaluate again
            record = {"iter": total, **self.evaluate(), "train_seconds": self.train_seconds,
                      "images_per_second": total * self.global_batch / max(self.train_seconds, 1e-9)}
        summary = {
            "name": self.cfg.name,
            "model": self.cfg.model.name,
            "depth": self.cfg.model.depth,
            "plain": self.cfg.model.plain,
            "seed": self.cfg.train.seed,
            "iterations": total,
            "test_error": record["test_error"],
            "val_error": record.get("val_error"),
            "train_error": record.get("train_error"),
            "train_seconds": self.train_seconds,
            "images_per_second": record["images_per_second"],
            "parameters": self.num_params,
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "device": device_name(self.device),
            "precision": self.precision,
            "loader": self.cfg.data.loader,
        }
        if self.ctx.is_main:
            checkpoint.atomic_save(
                {"model": self.model.state_dict(), "config": self.cfg.to_dict(), "iteration": total,
                 "mean": self.mean.cpu()},
                self.run_dir / "model.pt",
            )
            checkpoint.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.logger.summary(summary)
            self.logger.log_model(self.run_dir, self.mean.cpu().numpy(), summary)  # W&B model artifact
        return summary


@torch.no_grad()
def error_rates(model: nn.Module, loaders: dict, mean: torch.Tensor, memory_format, autocast) -> dict[str, float]:
    """Error (%) on each evaluation set, single view (mean subtraction only). Every rank counts
    its shard; the counts are all-reduced, so the figure is exact under DDP."""
    model.eval()
    out = {}
    for name, loader in loaders.items():
        counts = torch.zeros(2, dtype=torch.float64, device=mean.device)
        for images, labels in loader:
            x = normalize(images, mean).contiguous(memory_format=memory_format)
            with autocast():
                logits = model(x)
            counts[0] += (logits.argmax(1) != labels).sum()
            counts[1] += labels.numel()
        dist.all_reduce_sum(counts)
        out[f"{name}_error"] = 100.0 * counts[0].item() / counts[1].item()
    model.train()
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"



def _test_kill_iteration() -> int:
    """Fault injection for the elastic-restart test: SIGKILL this worker once it completes
    iteration $RESNETDIST_TEST_KILL_AT, on rank $RESNETDIST_TEST_KILL_RANK, first attempt only."""
    at = os.environ.get("RESNETDIST_TEST_KILL_AT")
    if not at or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return -1
    if os.environ.get("RANK", "0") != os.environ.get("RESNETDIST_TEST_KILL_RANK", "0"):
        return -1
    return int(at)
