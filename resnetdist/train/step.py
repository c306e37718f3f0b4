"""One training step as a callable: step(images_u8, labels, aug) does augmentation, forward
(autocast), backward, the SGD update and the metric sums, all on the device.

The step reads its lr from a per-iteration table on the device and counts iterations on the
device, so the host only feeds a batch and its augmentation numbers. That keeps the step
identical whether it runs eagerly, compiled, or replayed as one CUDA graph, and the schedule
needs no re-capture. Loss and error sums stay on the device until `drain()`: no host sync
per step. bench, the trainer and the tests all drive this one object.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..data.augment import augment
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


class CudaOps:
    """The torch.cuda calls that graph capture makes, in one place, so that a test can pass a
    stand-in and check on a CPU which stream each phase runs on."""

    def side_stream(self):
        """A new stream that first waits for the work already queued on the current one."""
        side = torch.cuda.Stream()
        self.wait_for_current(side)
        return side

    def wait_for_current(self, stream) -> None:
        stream.wait_stream(torch.cuda.current_stream())

    def use(self, stream):
        return torch.cuda.stream(stream)

    def join(self, stream) -> None:
        torch.cuda.current_stream().wait_stream(stream)

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def record(self, graph, stream, body: Callable[[], None]) -> None:
        # stream=: capture on our side stream, not on a fresh one of torch.cuda.graph's own
        with torch.cuda.graph(graph, stream=stream):
            body()


class StaticInputs:
    """The graphed step's input buffers. A loader that gathers straight into `out` (images,
    labels) spares the copy into them; a batch from anywhere else is copied (`copies` counts
    those, so a test or the doctor can see which path ran)."""

    def __init__(self, b: int, device: torch.device):
        self.x = torch.zeros((b, 3, 32, 32), dtype=torch.uint8, device=device)
        self.y = torch.zeros(b, dtype=torch.long, device=device)
        self.aug = torch.zeros((3, b), dtype=torch.long, device=device)
        self.copies = 0

    @property
    def out(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def load(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        if images_u8 is not self.x:
            self.x.copy_(images_u8, non_blocking=True)
            self.y.copy_(labels, non_blocking=True)
            self.copies += 1
        self.aug.copy_(aug, non_blocking=True)


class TrainStep:
    """The step of one rank. `model` is the plain module (what checkpoints save); the step
    wraps it in DDP and torch.compile as asked, and with graph=True captures the whole step
    once (CUDA only) and replays it; if capture fails, it says so in one line and runs eagerly
    (`kind` says what runs). Counters start at `start_iter`. A graph points at the model's and
    optimizer's tensors: load a checkpoint into a built step only with `load_state`, which
    copies in place."""

    def __init__(self, model: nn.Module, optimizer: TensorLRSGD, mean: torch.Tensor, lrs: torch.Tensor, *,
                 precision: str, memory_format=torch.contiguous_format, start_iter: int = 0, ddp: bool = False,
                 compile_mode: str = "none", graph: bool = False, batch_per_rank: int = 0,
                 ops: CudaOps | None = None):
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
        self.inputs: StaticInputs | None = None  # the graph's input buffers
        self.capture_error: str | None = None  # why capture failed, when it did
        self.ops = ops or CudaOps()
        # one side stream for DDP construction, warm-up and capture: DDP's reducer keeps the
        # gradient-accumulator nodes made on the stream it was built on, and a capture on any
        # other stream fails (PyTorch's CUDA-graph notes; Megatron-LM met it on H100s)
        self.side = self.ops.side_stream() if graph else None
        with self._on_side():
            self.train_model = self._wrap(model, ddp, compile_mode, graph)
        self._run = self._capture_or_eager(batch_per_rank) if graph else self._eager

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

    def load_state(self, model_state: dict, optimizer_state: dict, iteration: int) -> None:
        """Load weights, optimizer state and the iteration into this step, in place: every
        tensor a captured graph reads keeps its address (TensorLRSGD.load_state_dict copies
        momentum into the existing buffers; Module.load_state_dict copies into parameters)."""
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.it.fill_(iteration)
        self.stats.zero_()
        self.bad_iter.fill_(-1)

    # ----- building ------------------------------------------------------------------------

    def _on_side(self):
        return self.ops.use(self.side) if self.side is not None else nullcontext()

    def _wrap(self, model: nn.Module, ddp: bool, compile_mode: str, graph: bool) -> nn.Module:
        if ddp:
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

    def _graph_body(self, inputs: StaticInputs) -> None:
        # grads set to None first: during capture the backward then allocates them from the
        # graph's pool, and each replay overwrites them instead of accumulating
        self.optimizer.zero_grad(set_to_none=True)
        self._step(inputs.x, inputs.y, inputs.aug)

    def _capture_or_eager(self, b: int):
        """The graphed step, or the eager one (with one line saying why) if capture fails on any
        rank: the ranks agree, so none waits in a collective that the others skip."""
        try:
            run, error = self._capture(b), None
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager step
            run, error = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        failed = dist.all_reduce_sum(torch.tensor([float(error is not None)], device=self.device))
        if error is None and failed.item() == 0:
            return run
        self.kind, self.inputs = "eager", None
        self.optimizer.zero_grad(set_to_none=True)  # the warm-up's last gradients
        self.capture_error = error or "capture failed on another rank"
        print(f"warning: CUDA-graph capture failed ({self.capture_error}); training continues with "
              f"the eager step", file=sys.stderr, flush=True)
        return self._eager

    def _capture(self, b: int):
        """Record the whole step as one CUDA graph. Warm-up steps (needed before capture, and
        by DDP) change weights, optimizer state and BN statistics, so those are restored in
        place afterwards, whether capture worked or not: the graph keeps pointing at the same
        tensors, and an eager fall-back starts from the same state."""
        inputs = StaticInputs(b, self.device)
        keep = list(self.model.state_dict().values()) + [
            s["momentum_buffer"] for s in self.optimizer.state.values()
        ] + [self.it, self.stats, self.bad_iter]
        saved = [t.detach().clone() for t in keep]
        graph = self.ops.new_graph()
        self.ops.wait_for_current(self.side)  # the buffers and copies above come first
        try:
            with self._on_side():
                for _ in range(GRAPH_WARMUP):
                    self._graph_body(inputs)
                self.ops.record(graph, self.side, lambda: self._graph_body(inputs))
        finally:
            self.ops.join(self.side)
            with torch.no_grad():
                for t, s in zip(keep, saved):
                    t.copy_(s)
        self.inputs = inputs

        def replay(images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
            inputs.load(images_u8, labels, aug)
            graph.replay()

        return replay
