"""One training step as a callable: step(images_u8, labels, aug) does augmentation, forward
(autocast), backward, the SGD update and the metric sums, all on the device.

The step reads its lr from a per-iteration table on the device and counts iterations there, so
the host only hands it a batch already on the device (data/feed.py). That keeps the step
identical whether it runs eagerly, compiled, or replayed as one CUDA graph, and the schedule
needs no re-capture. Loss and error sums stay on the device until `drain()`: no host sync per step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import dist
from ..config import ConfigError
from ..data.augment import augment
from ..errors import GraphUnavailable
from ..pack import member_losses, member_sums, pack_batch
from .graph import CaptureFailed, GraphCapture, StaticInputs
from .optim import TensorLRSGD
from .wrap import wrap_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    # no cast cache: a cache filled during CUDA-graph capture would hold stale casts on replay
    # (PyTorch's graph notes), and each weight is cast once per step here anyway
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=False)


@dataclass(frozen=True)
class StepChoice:
    """The step that runs and why: choose_kind's answer, then build_step's (an auto graph whose
    capture failed becomes eager, saying so)."""

    kind: str  # eager | compile | graph
    reason: str  # why this one, in words
    asked: str  # train.step as given: auto may fall back to eager, a step named may not

    @property
    def fell_back(self) -> bool:
        """auto wanted the graph here and the eager step runs instead (its capture failed)."""
        return self.asked == "auto" and self.reason.startswith("auto: CUDA-graph capture failed")


def choose_kind(step: str, on_cuda: bool, precision: str) -> StepChoice:
    """The step that runs, from train.step (the one place that decides it). auto: the whole-step
    graph on CUDA with bf16 or fp32 (4x the eager step at batch 128 on one H100, measured by a
    plain PyTorch script of this recipe: docs/gpu-acceptance.md), else eager. A step asked for by
    name runs or the run stops: graph without CUDA is a ConfigError here, before any worker starts
    (graph + fp16 is one in config.validate); a failed capture stops it in build_step."""
    if step == "auto":
        if not on_cuda:
            return StepChoice("eager", "auto: no CUDA device, so no CUDA graph", step)
        if precision not in ("bf16", "fp32"):
            return StepChoice("eager", f"auto: {precision}'s loss scaler syncs with the host, which a graph cannot hold", step)
        return StepChoice("graph", f"auto: CUDA with {precision}", step)
    if step == "graph" and not on_cuda:
        raise ConfigError("train.step = graph needs a CUDA device, and this run's device is cpu: use "
                          "train.step=auto (the graph where it can run, else eager) or train.step=eager")
    return StepChoice(step, "asked for by name (train.step)", step)


class TrainStep:
    """The step of one rank, built by build_step. `model` is the plain module (what checkpoints
    save); `train_model` is what trains (wrapped in DDP / torch.compile, wrap.py). A graph points
    at the model's and optimizer's tensors: load a checkpoint into a built step only with
    `load_state`, which copies in place."""

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: TensorLRSGD, mean: torch.Tensor,
                 lrs: torch.Tensor, *, precision: str, memory_format, choice: StepChoice):
        self.model, self.train_model, self.optimizer, self.mean = model, train_model, optimizer, mean
        self.device = mean.device
        self.precision, self.memory_format = precision, memory_format
        self.choice = choice
        self.lrs_host = lrs
        # device-side state the step reads and writes (static addresses, for graph capture)
        self.lrs = lrs.to(self.device)
        self.lr = optimizer.lr  # the device tensor the optimizer reads its lr from
        self.it = torch.zeros((), dtype=torch.long, device=self.device)
        # per member of a pack (models.py, pack.py; one run: K = 1): loss sum, wrong count,
        # sample count, and the first iteration whose loss was not finite
        self.members = getattr(model, "members", 1)
        if precision == "fp16" and self.members > 1:
            raise ValueError("train.precision = fp16 cannot train a pack: its loss scaler would skip every "
                             "member's step when one member overflows")
        self.stats = torch.zeros(self.members, 3, device=self.device)
        self.bad_iter = torch.full((self.members,), -1, dtype=torch.long, device=self.device)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self._run = self._eager  # a graph's replay once captured (build_step)
        self.inputs: StaticInputs | None = None  # the graph's input buffers

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        self._run(images_u8, labels, aug)

    kind = property(lambda self: self.choice.kind)  # the step that runs: eager, compile or graph

    def lr_of(self, it: int) -> float:
        """The lr iteration `it` (1-based, as counted after the step) trained with."""
        return float(self.lrs_host[it - 1])

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """Per member (one run: K = 1), the metric sums since the last drain, summed over ranks
        (K, 3: loss sum, wrong, count), and the first iteration whose loss was not finite on this
        rank (K,; -1: none). One host sync."""
        stats = dist.all_reduce_sum(self.stats.clone()).cpu().numpy().astype(np.float64)
        self.stats.zero_()
        return stats, self.bad_iter.cpu().numpy()

    def load_state(self, model_state: dict, optimizer_state: dict, iteration: int) -> None:
        """Weights, optimizer state and the iteration, copied in place: every tensor a captured
        graph reads keeps its address (TensorLRSGD.load_state_dict copies into the momentum buffers)."""
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.it.fill_(iteration)
        self.stats.zero_()
        self.bad_iter.fill_(-1)

    def device_state(self) -> list[torch.Tensor]:
        """Every tensor a step changes: what graph capture restores after its warm-up."""
        momentum = [s["momentum_buffer"] for s in self.optimizer.state.values()]
        return list(self.model.state_dict().values()) + momentum + [self.it, self.stats, self.bad_iter]

    # ----- the step's math ---------------------------------------------------------------------

    def _compute(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        # index_select, not lrs[it]: a 0-d index tensor would be read back to the host
        self.lr.copy_(self.lrs.index_select(0, self.it.clamp(max=len(self.lrs) - 1).view(1)).squeeze(0))
        if self.members == 1:
            x = augment(images_u8, self.mean, aug)
        else:  # member j's images[j] augmented with aug[j], in its channel slice
            x = pack_batch(images_u8, self.mean, aug, self.model.stem_channels)
        x = x.contiguous(memory_format=self.memory_format)
        with autocast(self.precision, self.device):
            logits = self.train_model(x)
            loss, losses = member_losses(logits, labels)  # losses: each member's (one run: K = 1)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            self.stats.add_(member_sums(logits, labels, losses))
            first_bad = (self.bad_iter < 0) & ~torch.isfinite(losses)
            self.bad_iter.copy_(torch.where(first_bad, self.it, self.bad_iter))
            self.it.add_(1)

    def _eager(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        self._compute(images_u8, labels, aug)
        self.optimizer.zero_grad(set_to_none=True)

    def graph_body(self, inputs: StaticInputs) -> None:
        """The step as captured: grads set to None first, so that during capture the backward
        allocates them from the graph's pool, and each replay overwrites them instead of
        accumulating."""
        self.optimizer.zero_grad(set_to_none=True)
        self._compute(inputs.x, inputs.y, inputs.aug)


def build_step(model: nn.Module, optimizer: TensorLRSGD, mean: torch.Tensor, lrs: torch.Tensor, *,
               choice: StepChoice, compile_mode: str = "default", precision: str, memory_format=torch.contiguous_format,
               ddp: bool = False, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> TrainStep:
    """The step `choice` names: the model wrapped in DDP, and in torch.compile for the compile step
    (wrap.py); the graph step captured once with `inputs` (the feed's buffers) as its static
    inputs. A failed capture stops a graph asked for by name (GraphUnavailable, before any
    training step); under auto the eager step runs from the same state, and its choice says why."""
    graph = choice.kind == "graph"
    capture = GraphCapture() if graph else None
    with capture.on_side() if capture is not None else nullcontext():  # DDP built where capture runs
        train_model = wrap_model(model, mean.device, ddp, compile_mode if choice.kind == "compile" else "none", graph)
    step = TrainStep(model, train_model, optimizer, mean, lrs, precision=precision, memory_format=memory_format,
                     choice=choice)
    if capture is not None:
        if inputs is None:
            raise ValueError("a graph step is captured with sample inputs: build_step(..., inputs=...)")
        static = StaticInputs(*inputs)
        try:
            step._run, step.inputs = capture.capture_agreed(step, static), static
        except CaptureFailed as e:
            if choice.asked != "auto":
                raise GraphUnavailable(f"train.step = graph: CUDA-graph capture failed ({e}); the run stops "
                                       f"before training. train.step=auto runs the eager step instead "
                                       f"(about 4x slower), saying so") from e
            step.choice = StepChoice("eager", f"auto: CUDA-graph capture failed ({e}); the eager step runs, "
                                              f"about 4x slower", choice.asked)
    return step
