"""One training step as a callable: step(images_u8, labels, aug) does augmentation, forward
(autocast), backward, the SGD update and the metric sums, all on the device.

The step reads its lr from a per-iteration table on the device and counts iterations on the
device, so the host only feeds a batch and its augmentation numbers. That keeps the step
identical whether it runs eagerly, compiled, or replayed as one CUDA graph, and the schedule
needs no re-capture. Loss and error sums stay on the device until `drain()`: no host sync
per step. bench, the trainer and the tests all drive this one object.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist
from .data.augment import augment
from .optim import TensorLRSGD

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAPH_WARMUP = 11  # DDP needs 11 warm-up iterations before capture (PyTorch's CUDA graph notes)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    # no cast cache: a cache filled during CUDA-graph capture would hold stale casts on replay
    # (PyTorch's graph notes), and each weight is cast once per step here anyway
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=False)


def step_kind(compile_mode: str, graph: bool) -> str:
    """The name of the step that runs: graph, compile or eager."""
    return "graph" if graph else "compile" if compile_mode != "none" else "eager"


class TrainStep:
    """The step of one rank. `model` is the plain module (what checkpoints save); the step
    wraps it in DDP and torch.compile as asked, and with graph=True captures the whole step
    once (CUDA only) and replays it. Counters start at `start_iter`: build the step after
    loading a checkpoint, so a captured graph points at the loaded tensors."""

    def __init__(self, model: nn.Module, optimizer: TensorLRSGD, mean: torch.Tensor, lrs: torch.Tensor, *,
                 precision: str, memory_format=torch.contiguous_format, start_iter: int = 0, ddp: bool = False,
                 compile_mode: str = "none", graph: bool = False, batch_per_rank: int = 0):
        self.model, self.optimizer, self.mean = model, optimizer, mean
        self.device = mean.device
        self.precision, self.memory_format = precision, memory_format
        self.kind = step_kind(compile_mode, graph)
        self.lrs_host = lrs
        # device-side state the step reads and writes (static addresses, for graph capture)
        self.lrs = lrs.to(self.device)
        self.lr = optimizer.lr  # the device tensor the optimizer reads its lr from
        self.it = torch.full((), start_iter, dtype=torch.long, device=self.device)
        self.stats = torch.zeros(3, device=self.device)  # loss sum, wrong count, sample count
        self.bad_iter = torch.full((), -1, dtype=torch.long, device=self.device)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.train_model = self._wrap(model, ddp, compile_mode, graph)
        self._run = self._capture(batch_per_rank) if graph else self._eager

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        self._run(images_u8, labels, aug)

    def lr_of(self, it: int) -> float:
        """The lr iteration `it` (1-based, as counted after the step) trained with."""
        return float(self.lrs_host[it - 1])

    def drain(self) -> tuple[np.ndarray, int]:
        """The metric sums since the last drain, summed over ranks (loss sum, wrong, count), and
        the first iteration whose loss was not finite on this rank (-1: none). One host sync."""
        stats = dist.all_reduce_sum(self.stats.clone()).cpu().numpy().astype(np.float64)
        self.stats.zero_()
        return stats, int(self.bad_iter.item())

    # ----- building ------------------------------------------------------------------------

    def _wrap(self, model: nn.Module, ddp: bool, compile_mode: str, graph: bool) -> nn.Module:
        if ddp:
            # a backward captured in a graph needs DDP built on a side stream (PyTorch's CUDA
            # graphs notes, "Usage with DistributedDataParallel")
            with torch.cuda.stream(torch.cuda.Stream()) if graph else nullcontext():
                on_cuda = self.device.type == "cuda"
                model = DDP(model, device_ids=[self.device.index] if on_cuda else None)
        if compile_mode != "none":
            mode = None if compile_mode == "default" else "max-autotune"
            if mode and graph:
                mode = "max-autotune-no-cudagraphs"  # our own graph captures the whole step
            model = torch.compile(model, mode=mode)
        return model

    def _step(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        # index_select, not lrs[it]: a 0-d index tensor would be read back to the host
        self.lr.copy_(self.lrs.index_select(0, self.it.clamp(max=len(self.lrs) - 1).view(1)).squeeze(0))
        x = augment(images_u8, self.mean, aug).contiguous(memory_format=self.memory_format)
        with autocast(self.precision, self.device):
            logits = self.train_model(x)
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

    def _eager(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        self._step(images_u8, labels, aug.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)

    def _capture(self, b: int):
        """Record the whole step as one CUDA graph. Warm-up steps (needed before capture, and
        by DDP) change weights, optimizer state and BN statistics, so those are restored in
        place afterwards: the graph keeps pointing at the same tensors."""
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
            for _ in range(GRAPH_WARMUP):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(static_x, static_y, static_aug)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(static_x, static_y, static_aug)
        with torch.no_grad():
            for t, s in zip(keep, saved):
                t.copy_(s)

        def replay(images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
            static_x.copy_(images_u8, non_blocking=True)
            static_y.copy_(labels, non_blocking=True)
            static_aug.copy_(aug, non_blocking=True)
            graph.replay()

        return replay
