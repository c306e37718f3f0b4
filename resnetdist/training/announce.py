"""What a run tells the person who started it: where it starts, what will run, and for
`train --dry-run` the resolved configuration as well. Text only: nothing here decides, reads the
run directory or writes. Output for programs stays in summary.json and `train --json`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..config import RunConfig
from ..progress import duration, plural
from ..rundir import RunDir, StartPoint, config_texts
from .plan import Plan


def where(start: StartPoint, iters: int) -> str:
    if start.summary is not None:
        return "finished (summary.json holds its result)"
    if start.checkpoint is not None:
        return f"resuming from {start.checkpoint.name} (iteration {start.iteration} of {iters})"
    return "fresh start (no checkpoint in the run directory)"


def facts(cfg: RunConfig, plan: Plan, start: StartPoint, fallback: str = "") -> list[tuple[str, str]]:
    """The header's (what, value) rows; `fallback`: what would run instead of the step."""
    from ..models import build_model, count_parameters

    o, t, ranks = cfg.optim, cfg.train, plan.world_size
    return [
        ("net", f"{paper_name(cfg)} ({count_parameters(build_model(cfg.model)):,} parameters)"),
        ("device", f"{plan.device}, {ranks} rank{'s' if ranks > 1 else ''}"),
        ("precision", plan.precision),
        ("step", f"{plan.step} ({plan.step_reason}){fallback}"),
        ("loader", plan.loader),
        ("iterations", f"{o.iters:,} ({lr_words(cfg)}; {cadence_words(o.iters, t.eval_every, t.checkpoint_every)})"),
        ("batch per rank", f"{plan.batch_per_rank} ({plan.global_batch} per iteration)"),
        ("run directory", str(cfg.run_dir)),
        ("start", where(start, o.iters)),
    ]


def paper_name(cfg: RunConfig) -> str:
    """ResNet-20, Plain-56: the net as the paper names it (shortcut B, which the paper's CIFAR nets do not use, said)."""
    m = cfg.model
    return f"{'Plain' if m.plain else 'ResNet'}-{m.depth}" + (", projection shortcuts (B)" if m.shortcut == "B" and not m.plain else "")


def lr_words(cfg: RunConfig) -> str:
    """'lr 0.01 for the first 400 iterations (warm-up), then 0.1, /10 at 32,000, 48,000'."""
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


def dry_run(cfg: RunConfig, plan: Plan, start: StartPoint, notes: list[str] = ()) -> str:
    """`train --dry-run`: config.toml and resolved.toml as the run would write them, then what would run."""
    auto_graph = plan.step_asked == "auto" and plan.step == "graph"  # not built here: no capture tried
    rows = facts(cfg, plan, start, "; if its capture fails, eager" if auto_graph else "")
    if plan.device == "cpu":  # not measured here: the dry run takes no step
        rows.append(("estimate", cpu_estimate(cfg, plan, start.iteration) + "; the run measures its own"))
    config, resolved = config_texts(cfg, asdict(plan))
    lines = [f"# configuration of {cfg.run_dir}", config.rstrip(), "", "# resolved on this machine", resolved.rstrip(), "",
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


def cpu_estimate(cfg: RunConfig, plan: Plan, start_iter: int, eval_images: int = 10_000, members: int = 1) -> str:
    """How long the rest of a CPU run (a pack of `members` runs: their sum, on a CPU) may take,
    evaluations included, from the measured constants above."""
    per_image = CPU_S_PER_ITER_RESNET20 / 128 * (cfg.model.n / 3) * members
    train_s = per_image * plan.batch_per_rank * (cfg.optim.iters - start_iter)
    iters, every = cfg.optim.iters, cfg.train.eval_every
    count = iters // every - start_iter // every + (iters % every != 0)  # every `every`, and at the end
    eval_s = CPU_EVAL_COST * per_image * eval_images / plan.world_size * count
    return f"about {duration(train_s + eval_s)}, {plural(count, 'evaluation')} included (2-core CPU rates)"


def header(runs: list[tuple[RunConfig, StartPoint]], plan: Plan, eval_images: int, data: str,
           finished: list[RunConfig] = ()) -> str:
    """What opens a run on rank 0, once the step is built: the facts, the data (verified CIFAR-10
    or not) and on a CPU how long (on a GPU the bar measures it). `runs`: each training run's
    configuration and start (a pack's members); `finished`: runs asked for that are finished already."""
    (cfg, start), k = runs[0], len(runs)
    rows = facts(cfg, plan, start)
    rows.insert(1, ("data", data))
    if plan.device == "cpu":
        rows.append(("estimate", cpu_estimate(cfg, plan, start.iteration, eval_images, k)))
    name = cfg.name
    if k > 1:
        name = f"a pack of {k} runs of {paper_name(cfg)} in one fused model: {cfg.name}"
        rows.insert(1, ("pack", f"{k} seeds ({', '.join(str(m.train.seed) for m, _ in runs)}), "
                                f"each run as if alone, in its own run directory"))
        rows += [(m.name, f"{m.run_dir}: {where(s, m.optim.iters)}") for m, s in runs[1:]]
    rows += [(m.name, f"{m.run_dir}: finished (summary.json holds its result)") for m in finished]
    return f"{name}:\n{format_facts(rows)}"


def closing(summary: dict[str, Any], cfg: RunConfig) -> str:
    run = RunDir(cfg.run_dir)
    rows = [(run.model.name, str(run.model)), (run.summary.name, str(run.summary))]
    if cfg.log.tensorboard:
        rows.append(("TensorBoard", f"tensorboard --logdir {run.path / 'tb'}"))
    rows.append(("report", f"resnetdist report {run.path}"))
    result = (f"{summary['name']}: test error {summary['test_error']:.2f}% after {plural(summary['iterations'], 'iteration')}, "
              f"{duration(summary['train_seconds'])} of training ({summary['images_per_second']:,.0f} img/s)")
    return f"{result}\n{format_facts(rows)}"


def nothing_to_do(summary: dict[str, Any], cfg: RunConfig) -> str:
    return (f"{cfg.run_dir} holds a finished run (summary.json): nothing to do. To train it again, delete "
            f"that folder or pass another --out.\n{closing(summary, cfg)}")
