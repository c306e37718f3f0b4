"""What a run tells the person who started it: where it starts (fresh, from which checkpoint,
or already finished: worker.where_it_starts finds it), what will run (net, device, precision,
step, loader, length, batch, run directory), and for `train --dry-run` the resolved
configuration as well. Text only: nothing here decides, reads the run directory or writes.
Output for programs stays in summary.json and `train --json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..config import RunConfig, dumps_toml
from ..progress import duration, plural
from .schedule import global_batch


class Start(Protocol):
    """What the header says of where a run starts (worker.Start: worker.py finds it)."""

    iteration: int
    checkpoint: Path | None
    summary: dict[str, Any] | None


def where(start: Start, iters: int) -> str:
    """The header's "start" line: finished, resuming from which checkpoint, or fresh."""
    if start.summary is not None:
        return "finished (summary.json holds its result)"
    if start.checkpoint is not None:
        return f"resuming from {start.checkpoint.name} (iteration {start.iteration} of {iters})"
    return "fresh start (no checkpoint in the run directory)"


def facts(cfg: RunConfig, world_size: int, start: Start, step: str = "") -> list[tuple[str, str]]:
    """(what, value) lines of the header: what will run, where, from where. `step`: the step
    that runs and why (step.StepChoice.describe); train.step as given when not known yet."""
    from ..models import build_model, count_parameters

    batch = global_batch(cfg, world_size)
    o, t = cfg.optim, cfg.train
    return [
        ("net", f"{paper_name(cfg)} ({count_parameters(build_model(cfg.model)):,} parameters)"),
        ("device", f"{t.device}, {world_size} rank{'s' if world_size > 1 else ''}"),
        ("precision", t.precision),
        ("step", step or t.step),
        ("loader", cfg.data.loader),
        ("iterations", f"{o.iters:,} ({lr_words(cfg)}; {cadence_words(o.iters, t.eval_every, t.checkpoint_every)})"),
        ("batch per rank", f"{batch // world_size} ({batch} per iteration)"),
        ("run directory", str(cfg.run_dir)),
        ("start", where(start, o.iters)),
    ]


def paper_name(cfg: RunConfig) -> str:
    """ResNet-20, Plain-56: the net as the paper names it (shortcut B, which the paper's CIFAR nets do not use, said)."""
    m = cfg.model
    return f"{'Plain' if m.plain else 'ResNet'}-{m.depth}" + (", projection shortcuts (B)" if m.shortcut == "B" and not m.plain else "")


def lr_words(cfg: RunConfig) -> str:
    """The lr schedule in words, the warm-up first: 'lr 0.01 for the first 400 iterations
    (warm-up), then 0.1, /10 at 32,000, 48,000'."""
    o = cfg.optim
    warmup = f"lr {o.warmup_lr:g} for the first {plural(o.warmup_iters, 'iteration')} (warm-up), then {o.lr:g}" \
        if o.warmup_iters > 0 else f"lr {o.lr:g}"
    steps = f"/{1 / o.gamma:g} at {', '.join(f'{m:,}' for m in o.milestones)}" if o.milestones else "constant"
    return f"{warmup}, {steps}"


def cadence_words(iters: int, eval_every: int, checkpoint_every: int) -> str:
    """When the run evaluates and checkpoints, as it will happen: a cadence as long as the run
    is 'at the end' (the loop always does both at the last iteration), not 'every 100' of a
    60-iteration run."""
    def when(every: int) -> str:
        if every >= iters:
            return "at the end"
        return f"every {every:,}" + ("" if iters % every == 0 else " and at the end")

    if when(eval_every) == when(checkpoint_every):
        return f"evaluation and checkpoint {when(eval_every)}"
    return f"evaluation {when(eval_every)}, checkpoint {when(checkpoint_every)}"


def format_facts(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def dry_run(cfg: RunConfig, world_size: int, start: Start, notes: list[str] = ()) -> str:
    """`train --dry-run`: the resolved configuration as TOML, then what would run."""
    from .step import choose_kind  # the step this machine would choose, as the run will

    choice = choose_kind(cfg.train.step, cfg.train.device == "cuda", cfg.train.precision)
    rows = facts(cfg, world_size, start, choice.describe() + ("; if its capture fails, eager" if choice.asked == "auto"
                                                             and choice.kind == "graph" else ""))
    if cfg.train.device == "cpu":  # not measured here: the dry run takes no step
        rows.append(("estimate", cpu_estimate(cfg, world_size, start.iteration) + "; the run measures its own"))
    lines = [f"# resolved configuration of {cfg.run_dir}", dumps_toml(cfg.to_dict()).rstrip(), "",
             "would run (--dry-run: nothing was started or written):", format_facts(rows)]
    return "\n".join([*lines, *(f"  note: {n}" for n in notes)])


# ResNet-20, batch 128, fp32 eager with the resident loader on the 2-core CPU of
# docs/bench/step-cpu-resnet20.json (`resnetdist bench --device cpu`): 0.27 s per iteration.
# The cost of a step grows with the blocks per stage (n) and the images per rank.
CPU_S_PER_ITER_RESNET20 = 0.27
# An evaluated image (forward only, batch data.eval_batch) costs 0.15-0.28 of a trained one on
# that CPU (timed at batch 1000 and 128): budget the upper end. On a short CPU run the
# evaluations of the 10,000 test images can take as long as the training itself.
CPU_EVAL_COST = 0.28


def evaluations(start_iter: int, iters: int, every: int) -> int:
    """How many evaluations the loop makes after start_iter: every `every`, and at the end."""
    return iters // every - start_iter // every + (iters % every != 0)


def cpu_estimate(cfg: RunConfig, world_size: int, start_iter: int, eval_images: int = 10_000) -> str:
    """How long the rest of a CPU run may take, training and evaluations, from the measured
    constants above."""
    per_image = CPU_S_PER_ITER_RESNET20 / 128 * (cfg.model.n / 3)
    train_s = per_image * global_batch(cfg, world_size) / world_size * (cfg.optim.iters - start_iter)
    count = evaluations(start_iter, cfg.optim.iters, cfg.train.eval_every)
    eval_s = CPU_EVAL_COST * per_image * eval_images / world_size * count
    return f"about {duration(train_s + eval_s)}, {plural(count, 'evaluation')} included (2-core CPU rates)"


def header(cfg: RunConfig, world_size: int, start: Start, eval_images: int = 10_000, data: str = "",
           step: str = "") -> str:
    """What opens a run on rank 0: what will run (`step`: the step built, and why), on which
    data (and whether it is verified CIFAR-10), where, from where (and on a CPU, how long; on a
    GPU the bar measures it at the first log point, from the step that runs)."""
    rows = facts(cfg, world_size, start, step)
    if data:
        rows.insert(1, ("data", data))
    if cfg.train.device == "cpu":
        rows.append(("estimate", cpu_estimate(cfg, world_size, start.iteration, eval_images)))
    return f"{cfg.name}:\n{format_facts(rows)}"


def closing(summary: dict[str, Any], cfg: RunConfig) -> str:
    """What closes a run on rank 0: the result in words, and where its files are."""
    run_dir = cfg.run_dir
    rows = [("model.pt", str(run_dir / "model.pt")), ("summary.json", str(run_dir / "summary.json"))]
    if cfg.log.tensorboard:
        rows.append(("TensorBoard", f"tensorboard --logdir {run_dir / 'tb'}"))
    rows.append(("report", f"resnetdist report {run_dir}"))
    return f"{result_line(summary)}\n{format_facts(rows)}"


def result_line(summary: dict[str, Any]) -> str:
    return (f"{summary['name']}: test error {summary['test_error']:.2f}% after {plural(summary['iterations'], 'iteration')}, "
            f"{duration(summary['train_seconds'])} of training ({summary['images_per_second']:,.0f} img/s)")


def finished(summary: dict[str, Any], cfg: RunConfig) -> str:
    """A rerun of a finished run: its result, and that nothing was done."""
    return (f"{cfg.run_dir} holds a finished run (summary.json): nothing to do. To train it again, delete "
            f"that folder or pass another --out.\n{closing(summary, cfg)}")
