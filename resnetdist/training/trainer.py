"""One rank's run: `build()` makes the loaders and feed, the model and optimizer and the step,
once; the Trainer it returns owns the loop (fit), evaluation, checkpoints and the summary.
worker.py, bench, doctor and the tests all build through here, so what they drive is what trains.

A pack (pack.py: K seeds of one net as one fused model) is K `Member`s of one Trainer: one model,
optimizer, step and feed; per member its configuration, run directory, metrics window, logger,
checkpoints and summary, each in the single run's format. A single run is the pack of one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import dist, pretrained
from ..config import RunConfig
from ..data import Cifar10, Loaders, open_loaders
from ..data.augment import training_mean
from ..data.feed import Feed
from ..errors import NonFiniteLoss, Preempted
from ..models import build_model, count_parameters
from ..pack import build_pack, fuse_optimizer_states, fuse_states, split_optimizer_state, split_state
from .bar import RunBar
from ..rundir import RunDir, append_failure
from .evaluate import error_rates, model_layout as memory_format  # evaluation uses the same layout
from .metrics import MetricLogger
from .loop import Cadence, Progress, after_step, drain, evaluation, failures, take_steps
from .optim import TensorLRSGD
from .preempt import Notice
from .plan import Plan, resolve
from .schedule import lr_table
from .step import StepChoice, TrainStep, build_step


def make_model(cfg: RunConfig, ctx: dist.DistContext, seeds: list[int] | None = None) -> tuple[nn.Module, TensorLRSGD]:
    """The net with its initial weights (the same on every rank) and its optimizer; with several
    `seeds`, their pack (channels_last packs take a 4th zero stem channel per member: models.py)."""
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    seeds = seeds or [cfg.train.seed]
    layout = memory_format(cfg, ctx.device)
    stem = 4 if len(seeds) > 1 and layout == torch.channels_last else 3
    model = build_pack(cfg.model, seeds, stem).to(ctx.device, memory_format=layout)
    if cfg.dist.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = torch.zeros((), device=ctx.device)  # the step writes each iteration's lr here
    return model, TensorLRSGD(model.parameters(), lr, cfg.optim.momentum, cfg.optim.weight_decay)


def build(cfg: RunConfig, ctx: dist.DistContext, data: Cifar10, stop: Notice | None = None,
          plan: Plan | None = None, members: list[RunConfig] | None = None) -> Trainer:
    """The run of this rank at iteration 0 (Trainer.load_state_dicts continues from a checkpoint).
    `plan`: what preflight resolved (None: resolved here, for bench, doctor and tests); `stop`: the
    preemption notice fit() asks at its log points; `members`: a pack's runs (None: `cfg` alone)."""
    members = members or [cfg]
    cfg, seeds = members[0], [m.train.seed for m in members]
    plan = plan or resolve(cfg, ctx.world_size)
    loaders = open_loaders(cfg.data, data, ctx, plan.global_batch, seeds)
    feed = Feed(loaders.train)
    mean = training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images).to(ctx.device)
    model, optimizer = make_model(cfg, ctx, seeds)
    with dist.stage("model broadcast (DDP set-up)"):  # a graph is captured with the feed's buffers as its inputs
        step = build_step(model, optimizer, mean, lr_table(cfg.optim, plan.lr_scale, cfg.dist.scale_warmup_iters),
                          choice=plan.choice, compile_mode=cfg.train.compile, precision=plan.precision,
                          memory_format=memory_format(cfg, ctx.device), ddp=ctx.distributed, inputs=feed.inputs)
    plan = plan.ran(step.choice)
    data_facts = {"train_images": len(data.train), "test_images": len(data.test),
                  "val_images": len(data.val) if data.val is not None else 0,
                  "data_identity": data.identity}  # cifar10 | modified | unknown (data/cifar.py identity)
    return Trainer(cfg, plan, ctx, model, optimizer, step, loaders, feed, data_facts, [Member(m) for m in members], stop)


@dataclass
class Member:
    """One run of a Trainer (a pack has one per seed)."""

    cfg: RunConfig
    progress: Progress = field(default_factory=Progress)  # where the run stands; a checkpoint carries it
    wandb_id: str | None = None  # the W&B run a checkpoint hands on to the next attempt
    failed: str = ""  # why it stopped early (its loss turned NaN or inf); its last good checkpoint is kept

    @property
    def run(self) -> RunDir:
        return RunDir(self.cfg.run_dir)

    def restore(self, state: dict[str, Any]) -> None:
        self.progress = Progress(int(state["iteration"]), float(state["train_seconds"]),
                                 state["train_window"].numpy().astype(np.float64))
        self.wandb_id = state.get("wandb_id") or None


@dataclass
class Trainer:
    """One rank's run, built by build(); fit() trains it from `progress` to the end."""

    cfg: RunConfig
    plan: Plan  # what this machine resolved, with the step that runs
    ctx: dist.DistContext
    model: nn.Module  # the plain module: what checkpoints save
    optimizer: TensorLRSGD
    step: TrainStep
    loaders: Loaders
    feed: Feed
    data_facts: dict[str, Any]  # train/test/val images in use and the data's identity (summary.json: a cut or stand-in data set shows)
    members: list[Member]  # a pack's, or the one of cfg alone
    stop: Notice | None = None  # asked at every log point: a signal noted there stops the run (Preempted)

    def __post_init__(self):
        self.nets = MemberNets(self.model, len(self.members), self.cfg, self.ctx.device, memory_format(self.cfg, self.ctx.device))

    @property
    def progress(self) -> Progress:  # a pack's members stand at the same iteration
        return self.members[0].progress

    def fit(self, logger: MetricLogger | list[MetricLogger]) -> Progress:
        """The training loop, from self.progress to optim.iters; `logger`: one per member. Between
        stops only steps run; at a log point the device's sums are drained and logged, then come the
        evaluation and the checkpoint when due, and a stop (agreed by all ranks) raises Preempted."""
        loggers = logger if isinstance(logger, list) else [logger]
        step, cadence = self.step, Cadence.of(self.cfg)
        for member, member_logger in zip(self.members, loggers):
            member.wandb_id = member_logger.wandb_id  # this attempt's W&B run: its checkpoints hand it on
        it = self.progress.iteration
        bar = RunBar(f"{pack_label(self.members)} ({step_label(step.choice)})", cadence.total, it, self.ctx.is_main,
                     next_stop=cadence.next_stop)
        batches = self.feed.batches(it)
        try:
            t0 = time.perf_counter()
            while it < cadence.total:
                until = cadence.next_stop(it)
                with dist.stage(f"training step (gradient all-reduce) in iterations {it + 1}-{until}"):
                    take_steps(step, batches, until - it, lambda done, first=it: after_step(bar, first + done))
                bar.to(until)
                it = until
                log_now, eval_now, ckpt_now = cadence.due(it)
                if not (log_now or eval_now or ckpt_now):
                    continue
                failed_before = [m.failed for m in self.members]
                with dist.stage(f"metrics all-reduce at iteration {it}"):
                    records = drain(step, self.members, it)  # syncs with the device, so the time below is real
                live = log_point(self.members, loggers, records, failed_before, it, time.perf_counter() - t0, bar,
                                 self.ctx.is_main)
                # the last iteration just finishes; a collective, so every rank asks at the same points
                reason = self.stop.agreed(it) if self.stop is not None and it < cadence.total else ""
                if eval_now:
                    with dist.stage(f"evaluation at iteration {it}"):
                        errors = self.evaluate()
                    log_evaluation(live, [e for e in errors if e is not None], step, it, self.feed.loader.iters_per_epoch,
                                   self.plan.global_batch, bar, named=len(self.members) > 1)
                if ckpt_now or reason:
                    self.checkpoint()
                if reason:
                    raise Preempted(it, reason)
                t0 = time.perf_counter()
        finally:
            bar.close()  # also on a stop or an error: no stale bar left on the terminal
        return self.progress

    def evaluate(self) -> list[dict[str, float] | None]:
        """Error (%) of each member on each evaluation set; None: the member failed."""
        evals, mean, layout = self.loaders.evals, self.step.mean, self.step.memory_format
        return [None if m.failed else error_rates(self.nets.single(state), evals, mean, layout)
                for m, state in zip(self.members, self.nets.states())]

    def state_dicts(self) -> list[dict[str, Any]]:
        """What each member's checkpoint holds, split off the pack's (MemberNets)."""
        return [checkpoint_state(self, member, model, optimizer) for member, model, optimizer
                in zip(self.members, self.nets.states(), self.nets.optimizer_states(self.optimizer))]

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue from each member's checkpoint state (all of one iteration), in place: every
        tensor a captured graph reads keeps its address (TrainStep.load_state)."""
        first, device = states[0], self.ctx.device
        model, optimizer = first["model"], first["optimizer"]
        if len(states) > 1:
            model = fuse_states([s["model"] for s in states])
            optimizer = fuse_optimizer_states([s["optimizer"] for s in states])
        self.step.load_state(model, optimizer, int(first["iteration"]))
        torch.set_rng_state(first["rng_cpu"])
        if "rng_cuda" in first and device.type == "cuda":
            torch.cuda.set_rng_state(first["rng_cuda"], device)
        for member, state in zip(self.members, states):
            member.restore(state)
        if (saved := int(first.get("world_size", 0))) not in (0, self.ctx.world_size):
            dist.print0(f"world size changed: the checkpoint was written by {saved} rank(s), "
                        f"this run has {self.ctx.world_size}")

    def checkpoint(self) -> None:
        """state_dicts() written by rank 0 into each member's folder (atomic, checksummed, the last
        train.keep_checkpoints kept; a failed member's last good one stays); every rank waits."""
        iteration = self.progress.iteration
        if self.ctx.is_main:  # watched: the other ranks wait for it in the barrier
            with dist.stage(f"checkpoint write at iteration {iteration}"):
                for member, state in zip(self.members, self.state_dicts()):
                    if not member.failed:
                        member.run.checkpoints.save(iteration, state, member.cfg.train.keep_checkpoints)
        with dist.stage(f"checkpoint barrier at iteration {iteration}"):
            dist.barrier()

    def finish(self) -> list[dict[str, Any] | None]:
        """Each member's summary (None: it failed); rank 0 writes each one's model.pt,
        model.safetensors (the same weights, no pickle) and summary.json."""
        summaries = summarize(self)
        if self.ctx.is_main:
            for member, model, summary in zip(self.members, self.nets.states(), summaries):
                if summary is not None:
                    weights = final_weights(model, member.cfg, member.cfg.optim.iters, self.step.mean)
                    member.run.write_model(weights)
                    pretrained.save(member.run.safetensors, self.nets.single(model), weights["mean"], member.cfg)
                    member.run.write_summary(summary)
        return summaries


class MemberNets:
    """A pack's members as single nets: their states in the single net's format and keys
    (pack.split_state), and one single net (built once) holding a member's state, through which
    members are evaluated and saved, so that summary.json's errors are what `eval model.pt`
    computes, with the same kernels. A single run is its own model."""

    def __init__(self, model: nn.Module, members: int, cfg: RunConfig, device: torch.device, layout):
        self.model, self.members, self.cfg, self.device, self.layout = model, members, cfg, device, layout
        self.net: nn.Module | None = None

    def states(self) -> list[dict[str, torch.Tensor]]:
        state = self.model.state_dict()
        return [state] if self.members == 1 else split_state(state, self.members)

    def optimizer_states(self, optimizer: TensorLRSGD) -> list[dict[str, Any]]:
        state = optimizer.state_dict()
        return [state] if self.members == 1 else split_optimizer_state(state, self.members)

    def single(self, state: dict[str, torch.Tensor]) -> nn.Module:
        if self.members == 1:
            return self.model
        if self.net is None:
            with torch.random.fork_rng(devices=[]):  # built without drawing from the run's RNG
                self.net = build_model(self.cfg.model).to(self.device, memory_format=self.layout)
        self.net.load_state_dict(state)
        return self.net


def checkpoint_state(trainer: Trainer, member: Member, model: dict, optimizer: dict) -> dict[str, Any]:
    """What a member's checkpoint holds: its part of the uncompiled model and of the optimizer
    (the single run's format), its progress (iteration, training time, the metric window), the
    RNG states, its config, the mean image, the world size and its W&B run id: everything
    needed to continue bit for bit, alone or in a pack, and to evaluate or export alone."""
    progress, device = member.progress, trainer.ctx.device
    state = {
        **final_weights(model, member.cfg, progress.iteration, trainer.step.mean),
        "optimizer": optimizer, "rng_cpu": torch.get_rng_state(),
        "train_window": torch.from_numpy(progress.window.copy()), "train_seconds": progress.train_seconds,
        "world_size": trainer.ctx.world_size, "wandb_id": member.wandb_id or "",
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def log_point(members: list[Member], loggers: list[MetricLogger], records: list[dict | None], failed_before: list[str],
              it: int, seconds: float, bar: RunBar, is_main: bool) -> list[tuple[Member, MetricLogger]]:
    """A log point after the drain: every member at `it` with `seconds` more of training; a
    member whose loss just turned NaN said and, in a pack, noted as failed in its folder while the
    others go on (NonFiniteLoss when none is left); the train records logged and shown (a pack's:
    their mean on the bar). Returns the members still training, with their loggers."""
    for member in members:
        member.progress.train_seconds += seconds
        member.progress.iteration = it
    if all(m.failed for m in members):
        raise NonFiniteLoss(failures(members))
    for member, before in zip(members, failed_before):
        if member.failed and not before and is_main:
            bar.write(f"{member.cfg.name}: {member.failed}. The pack's other runs go on.")
            append_failure(member.run.log, member.failed)
    live = [(m, lg, r) for m, lg, r in zip(members, loggers, records) if r is not None]
    for _, member_logger, record in live:
        member_logger.log(record, "train")
    bar.show(*(sum(r[key] for _, _, r in live) / len(live) for key in ("train_loss", "train_error")))
    return [(m, lg) for m, lg, _ in live]


def log_evaluation(live: list[tuple[Member, MetricLogger]], errors: list[dict[str, float]], step: TrainStep, it: int,
                   iters_per_epoch: int, global_batch: int, bar: RunBar, named: bool) -> None:
    """Each training member's evaluation record (loop.evaluation), logged and shown (`named`: a
    pack's lines start with the run's name)."""
    for (member, member_logger), member_errors in zip(live, errors):
        member.progress.last_eval, line = evaluation(step, member.progress, member_errors, it, iters_per_epoch,
                                                     global_batch)
        bar.write(f"{member.cfg.name}  {line}" if named else line)
        member_logger.log(member.progress.last_eval, "eval")


def pack_label(members: list[Member]) -> str:
    """The run's name; a pack's: resnet20-s0+1+2."""
    if len(members) == 1:
        return members[0].cfg.name
    return f"{members[0].cfg.model.name}-s" + "+".join(str(m.cfg.train.seed) for m in members)


def step_label(choice: StepChoice) -> str:
    """The progress bar's word for the step: its kind, and a fall-back said at a glance."""
    return f"{choice.kind}, graph capture failed" if choice.fell_back else choice.kind


def final_weights(model: dict[str, torch.Tensor], cfg: RunConfig, iteration: int, mean: torch.Tensor) -> dict[str, Any]:
    """What model.pt holds (`model`: the net's state): enough to evaluate or export the net
    without this run's files."""
    return {"model": model, "config": cfg.to_dict(), "iteration": iteration,
            "mean": mean.cpu()}  # the preprocessing mean image, for export / inference


def summarize(trainer: Trainer) -> list[dict[str, Any] | None]:
    """Each member's summary.json (None: it failed): its result and what produced it. Evaluates
    once more when the last evaluation is not at the end (a run resumed at its very end)."""
    ctx, step, members, plan = trainer.ctx, trainer.step, trainer.members, trainer.plan
    total = trainer.cfg.optim.iters
    errors = [None] * len(members)
    if any(not m.failed and (m.progress.last_eval is None or m.progress.last_eval["iter"] != total) for m in members):
        with dist.stage("final evaluation"):
            errors = trainer.evaluate()
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    pack = {"pack": len(members)} if len(members) > 1 else {}
    summaries = []
    for member, member_errors in zip(members, errors):
        cfg, progress, record = member.cfg, member.progress, member.progress.last_eval
        if member.failed:
            summaries.append(None)
            continue
        if member_errors is not None:  # global_batch: images per iteration over all ranks (a pack: of each member)
            speed = total * plan.global_batch / max(progress.train_seconds, 1e-9)
            record = {"iter": total, **member_errors, "images_per_second": speed}
        summaries.append({
            "name": cfg.name, "model": cfg.model.name, "depth": cfg.model.depth, "plain": cfg.model.plain,
            "seed": cfg.train.seed, "iterations": total,
            "test_error": record["test_error"], "val_error": record.get("val_error"),
            "train_error": record.get("train_error"),
            "train_seconds": progress.train_seconds, "images_per_second": record["images_per_second"],
            "parameters": count_parameters(step.model) // len(members), "world_size": ctx.world_size,
            "global_batch": plan.global_batch, **pack, "device": device,
            "precision": plan.precision, "step": step.kind, "step_reason": step.choice.reason,
            "loader": plan.loader, **trainer.data_facts,
        })
    return summaries
