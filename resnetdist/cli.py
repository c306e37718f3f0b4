"""The `resnetdist` command (also `python -m resnetdist`, which torchrun runs on every rank)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from .config import DEVICES, LOADERS, SHORTCUTS, ConfigError, RunConfig, depth_to_n, load_config
from .errors import BAD_INPUT, FAILED, INTERRUPTED, DataError

app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False,  # see main()
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Reproduce He et al. 2015 (section 4.2): ResNets and plain nets on CIFAR-10, on one GPU or many. "
         "Shell completion: resnetdist --install-completion.",
)


def _print_version(asked: bool) -> None:
    if asked:
        from . import __version__

        typer.echo(f"resnetdist {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    pass


# a config key's allowed values as a str Enum: --help lists them, the shell completes them, and
# anything else is refused with one line naming the option
Device, Loader, Shortcut, Launcher = (Enum(name, {v: v for v in values}, type=str) for name, values in (
    ("Device", DEVICES), ("Loader", LOADERS), ("Shortcut", SHORTCUTS), ("Launcher", ("local", "slurm"))))


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


def fail(message: str, code: int = BAD_INPUT) -> None:
    if message:  # empty: another rank prints the line (data/presence.py)
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def bad_input(*errors: type[Exception]) -> Iterator[None]:
    """The errors a command expects of what it was given: each one line and its exit code
    (errors.py; 2 for those without one)."""
    try:
        yield
    except typer.Exit:  # a RuntimeError too: a line already printed
        raise
    except errors as e:
        fail(str(e), getattr(e, "exit_code", BAD_INPUT))


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# options several commands share, declared once
DATA_DIR = typer.Option(None, help="folder holding cifar-10-batches-bin/ (or -py/) or its tarball")
RUN_DEVICE = typer.Option(None, help="default: auto (cuda when torch sees a GPU)")
DEVICE = typer.Option("auto")
BENCH_DATA = typer.Option(None, help="CIFAR-10 folder (default: synthetic data of the same size)")
BENCH_LOADERS = typer.Option("resident,ffcv", help="comma-separated: resident, ffcv")
RUN_DIRS = typer.Argument(..., help="run folders, or folders holding runs (searched one level down)")
WEIGHTS = typer.Argument(..., help="model.pt or ckpt_*.pt, or a run folder (its model.pt, else its newest checkpoint)")
JSON_RESULT = typer.Option(False, "--json", help="print the result as one JSON object")
TORCHRUN_N = ("under torchrun write -n 7 or --depth 44: torchrun's own parser takes --n for an abbreviation "
              "of its --nnodes/--nproc-per-node and stops (pytorch#120601)")


@app.command()
def train(
    settings: Optional[list[str]] = typer.Argument(None, metavar="[SECTION.KEY=VALUE]...", show_default=False, help=(
        "config overrides, as with --set (after it, so they win): what a W&B sweep agent's "
        "${args_no_hyphens} or a shell loop writes, e.g. model.n=5 train.seed=1")),
    depth: Optional[int] = typer.Option(None, "--depth", "-d", help="layers, 6n+2: 20, 32, 44, 56, 110, 1202 (or -n)"),
    n: Optional[int] = typer.Option(None, "--n", "-n", help=f"blocks per stage: depth 6n+2 (3->20, 5->32, 7->44, 9->56, 18->110); {TORCHRUN_N}"),
    plain: Optional[bool] = typer.Option(None, "--plain/--resnet", help="plain net (no shortcuts) or ResNet (the default)"),
    shortcut: Optional[Shortcut] = typer.Option(None, help="A: identity/zero-pad (paper), B: 1x1 projection"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file, e.g. configs/resnet20.toml"),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value, repeatable"),
    iters: Optional[int] = typer.Option(None, help="run N iterations (sets optim.iters); the default milestones and evaluation/checkpoint cadence move in proportion, a warm-up keeps its length (at most half the run), values given with --set are kept"),
    data_dir: Optional[Path] = DATA_DIR,
    out: Optional[Path] = typer.Option(None, help="run directory (default runs/<name>)"),
    device: Optional[Device] = RUN_DEVICE,
    seed: Optional[int] = typer.Option(None),
    seeds: Optional[str] = typer.Option(None, help="several seeds, e.g. 0,1,2,3, trained in one process as one fused "
                                        "model (a pack: docs/suite.md), each a run of its own; --out is then the "
                                        "folder of their run directories <net>-s<seed> (default runs/)"),
    loader: Optional[Loader] = typer.Option(None, help="resident (the dataset kept on the training device) or ffcv"),
    nproc_per_node: int = typer.Option(0, help="launch N workers with torchrun (0: this process only)"),
    max_restarts: int = typer.Option(0, help=(
        "with --nproc-per-node: elastic restarts after a worker dies or reports a hang (exit 7), each resuming from "
        "the newest checkpoint; 0 (the default on one machine): the job ends, its last line saying how to resume")),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the configuration and what this machine resolves of it (TOML) and what would run; start and write nothing"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line per rank (the result) instead of the summary in words"),
) -> None:
    """Train a ResNet or plain net with the paper's recipe."""
    from .checkpoint import ignore_file_size_signal

    ignore_file_size_signal()  # a file-size limit then fails the write (WriteError) instead of killing us
    try:
        flags = {"model": {"n": blocks_per_stage(depth, n), "plain": plain, "shortcut": _value(shortcut)},
                 "data": {"dir": str(data_dir) if data_dir else None, "loader": _value(loader)},
                 "train": {"out": str(out) if out else None, "device": _value(device), "seed": seed}}
        cfg = load_config(config, {s: {k: v for k, v in kv.items() if v is not None} for s, kv in flags.items()},
                          [*overrides, *bare_overrides(settings or [])], iters)
        members = pack_members(cfg, seeds, seed)
        from .dist import under_torchrun, world_size_from_env
        from .rundir import RunDir
        from .training.worker import preflight

        launching = bool(nproc_per_node) and not under_torchrun()  # this process starts torchrun
        world_size = nproc_per_node if launching else world_size_from_env()
        if dry_run:
            return show_dry_run(members[0] if members else cfg, world_size)
        prepared = preflight(members or cfg, world_size)
        # a launcher asks before starting torchrun for nothing; each rank asks in training/worker.py
        done = [RunDir(m.run_dir).finished(m.optim.iters, m.name) for m in members or [cfg]] if launching else [None]
    except (ConfigError, DataError, RuntimeError) as e:  # RunDirBusy (a RuntimeError): exit 5
        fail(str(e), getattr(e, "exit_code", BAD_INPUT))
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was written", code=INTERRUPTED)
    start(members or cfg, prepared, done, nproc_per_node if launching else 0, max_restarts, as_json)


def start(runs: RunConfig | list[RunConfig], prepared, done: list, nproc_per_node: int, max_restarts: int,
          as_json: bool) -> None:
    """After the checks: the result of runs already finished (`done`: each one's summary or None),
    or torchrun launched (nproc_per_node workers), or the run (a pack's runs) in this process."""
    if all(d is not None for d in done):
        return show_finished(done, runs if isinstance(runs, list) else [runs], as_json)
    if nproc_per_node:
        from .launcher import strip_launch_args, torchrun

        return torchrun(nproc_per_node, max_restarts, strip_launch_args(sys.argv[sys.argv.index("train") + 1 :]))
    train_here(runs, prepared, as_json)


def pack_members(cfg: RunConfig, seeds: str | None, seed: int | None) -> list[RunConfig]:
    """--seeds: the pack's member configurations (pack.member_configs); [] without it."""
    if seeds is None:
        return []
    if seed is not None:
        raise ConfigError(f"--seed {seed} and --seeds {seeds}: give one of them")
    from .pack import member_configs
    from .suite.reproduce import parse_ints  # --depths' parser: the same errors

    return member_configs(cfg, parse_ints(seeds, "--seeds"))


def blocks_per_stage(depth: int | None, n: int | None) -> int | None:
    """--depth (layers) or -n (blocks per stage), as model.n; both at once only when they agree."""
    if depth is None:
        return n
    try:
        from_depth = depth_to_n(depth)
    except ConfigError:
        raise ConfigError(f"--depth {depth}: not 6n+2 for some n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...)") from None
    if n is not None and n != from_depth:
        raise ConfigError(f"--depth {depth} is n = {from_depth}, but -n {n} was given too; give one of them")
    return from_depth


def bare_overrides(settings: list[str]) -> list[str]:
    """The positional section.key=value words; another word (a typo'd flag, a stray path) is named."""
    for word in settings:
        key = word.split("=", 1)[0]
        if "=" not in word or "." not in key or key.startswith("-"):
            raise ConfigError(f"{word!r}: expected section.key=value (e.g. train.seed=1), or an option such as --iters")
    return settings


def train_here(cfg: RunConfig | list[RunConfig], prepared, as_json: bool = False) -> None:
    """This process's rank of the run (a pack's runs: `cfg` a list): its faults as one line and an
    exit code, its result as a summary in words (rank 0) or a JSON line per rank and run."""
    from .dist import launch_rank
    from .errors import GraphUnavailable, NonFiniteLoss, PeerLost, Preempted, RunDirBusy, WriteError
    from .training.announce import closing
    from .training.worker import AlreadyFinished, main

    members = cfg if isinstance(cfg, list) else [cfg]
    where = (f"run directory {members[0].run_dir}" if len(members) == 1
             else f"run directories {', '.join(str(m.run_dir) for m in members)}")
    try:
        result = main(cfg, prepared)
    except AlreadyFinished as e:  # under torchrun: rank 0's run directory holds the result
        return show_finished(e.summaries, members, as_json)
    except NonFiniteLoss as e:
        if launch_rank() == 0:  # a pack's members that finished: their results first
            for summary in getattr(e, "done", []):
                typer.echo(closing(summary, next(m for m in members if m.name == summary["name"])))
        fail(f"{e} ({where})", code=e.exit_code)
    except (WriteError, RunDirBusy, PeerLost, DataError, GraphUnavailable) as e:  # errors.py: their exit codes (DataError: a node without betons)
        fail(str(e), code=e.exit_code)
    except Preempted as e:  # exit 6: not a failure, the scheduler's notice was obeyed (130: Ctrl-C)
        interrupted = e.reason == "SIGINT"
        if not interrupted or launch_rank() == 0:  # a person reads one line
            typer.echo(f"{'interrupted' if interrupted else 'preempted'}: {e} ({where})", err=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C
        fail(f"interrupted at once, without a checkpoint of this moment; run the same command again to "
             f"resume from the newest checkpoint in the {where}, if any", code=INTERRUPTED)
    rank = launch_rank()
    for member, summary in zip(members, result if isinstance(cfg, list) else [result]):
        if as_json:  # every rank prints its view of the result: the all-reduced errors must agree
            keys = ("name", "test_error", "iterations", "train_seconds", "images_per_second")
            typer.echo(json.dumps({"rank": rank, **{k: summary[k] for k in keys}}))
        elif rank == 0:
            typer.echo(closing(summary, member))


def show_finished(summaries: list[dict[str, Any]], members: list[RunConfig], as_json: bool) -> None:
    """A rerun of a finished run (a pack's finished runs): its result (rank 0), and nothing else."""
    from .dist import launch_rank
    from .training.announce import nothing_to_do

    if launch_rank() == 0:
        for summary, cfg in zip(summaries, members):
            typer.echo(json.dumps(summary) if as_json else nothing_to_do(summary, cfg))


def show_dry_run(cfg: RunConfig, world_size: int) -> None:
    """The checks a run makes before it starts (the data read, not downloaded), then the
    configuration with what this machine resolves of it, and what would run; nothing is written."""
    from .data.cifar import locate
    from .dist import launch_rank
    from .training.announce import dry_run
    from .training.plan import resolve
    from .training.worker import preflight, where_they_start

    notes = []
    try:
        cached = bool(cfg.data.dir) or bool(locate(None, download_ok=False))
    except DataError:
        cached = False
        notes.append("CIFAR-10 is not in the download cache: the run would download it first (163 MB)")
    plan = preflight(cfg, world_size).plan if cached else resolve(cfg, world_size)
    if launch_rank() == 0:
        typer.echo(dry_run(cfg, plan, where_they_start([cfg])[0], notes))


def show_weights_result(run, checkpoint: Path, describe, as_json: bool, *args) -> None:
    """`eval` and `export`: run(weights, *args) on a weights file as given, or on the one a run
    folder holds (RunDir.weights; a folder without one is left for checkpoint.load_model_file to
    name), its result printed; any bad input is one line."""
    from .errors import CheckpointError
    from .rundir import RunDir
    from .tools.export import ExportError

    with bad_input(ConfigError, DataError, CheckpointError, ExportError):
        result = run((RunDir(checkpoint).weights() or checkpoint) if checkpoint.is_dir() else checkpoint, *args)
    typer.echo(json.dumps(result) if as_json else describe(result))


@app.command("eval")
def eval_(
    checkpoint: Path = WEIGHTS,
    data_dir: Optional[Path] = typer.Option(None, help="override the run's data folder"),
    device: str = DEVICE,
    as_json: bool = JSON_RESULT,
) -> None:
    """Test error of a saved checkpoint."""
    from .training.evaluate import describe, evaluate_checkpoint

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {device!r}")
    show_weights_result(evaluate_checkpoint, checkpoint, describe, as_json, data_dir, device)


@app.command()
def prepare(
    data_dir: Optional[Path] = typer.Option(None, help="folder holding cifar-10-batches-bin/ (or -py/) or its tarball (default: download)"),
    out: Optional[Path] = typer.Option(None, help="where to write train.beton and test.beton (default: <data>/../beton)"),
    force: bool = typer.Option(False, help="rebuild even when up to date"),
) -> None:
    """Convert CIFAR-10 to FFCV .beton files (idempotent, atomic)."""
    from .data.beton import prepare_betons, require_ffcv
    from .data.cifar import locate

    with bad_input(DataError, RuntimeError):
        require_ffcv()
        folder = locate(data_dir)
        target = out or folder.parent / "beton"
        train_path, test_path, rebuilt = prepare_betons(folder, target, force=force,
                                                        announce=lambda what: typer.echo(what, err=True))
    typer.echo(f"{'wrote' if rebuilt else 'up to date, nothing to do:'} {train_path} {test_path}")


bench_app = typer.Typer(help="Speed: the training step against a plain PyTorch loop, and the loaders.")
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    n: int = typer.Option(3, "--n", "-n", help="blocks per stage (3 = ResNet-20)"),
    iters: int = typer.Option(500, help="timed iterations per setting"),
    warmup: int = typer.Option(30, help="untimed iterations first (compile and graph capture happen here)"),
    device: str = DEVICE,
    loaders: str = BENCH_LOADERS,
    modes: str = typer.Option("eager,compile,graph", help="comma-separated: eager, compile, graph"),
    precisions: str = typer.Option("fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16"),
    data_dir: Optional[Path] = BENCH_DATA,
    workers: int = typer.Option(min(8, os.cpu_count() or 1), help="DataLoader workers for the baseline"),
    out: Optional[Path] = typer.Option(None, help="where to write the results (JSON; default bench/step.json, "
                                                    "with --pack bench/pack.json)"),
    pack: str = typer.Option("", help="pack sizes K, comma-separated (e.g. 1,2,4,8): time K seeds fused into one "
                                      "model against the K runs one after another and one model at batch 128*K, "
                                      "with the step a run gets here, instead of the settings above"),
) -> None:
    """Time one training step: the baseline and each loader x mode x precision (or packs: --pack)."""
    if ctx.invoked_subcommand is not None:
        return
    out = out or Path("bench/pack.json" if pack else "bench/step.json")
    with bad_input(DataError, RuntimeError, ValueError):
        if pack:
            from .tools.bench_pack import PACK_ROUNDS, format_pack_table, run_pack_bench

            try:
                ks = [int(k) for k in _split(pack)]
            except ValueError:
                fail(f"--pack {pack}: pack sizes are whole numbers, comma-separated (e.g. 1,2,4,8)")
            table = format_pack_table(run_pack_bench(n, ks, iters, warmup, PACK_ROUNDS, device, out))  # written after every K
        else:
            from .tools.bench import format_table, run_step_bench

            table = format_table(run_step_bench(n, iters, warmup, device, _split(loaders), _split(modes),
                                                _split(precisions), data_dir, workers, out))  # written after every setting
    typer.echo(f"{table}\n\nwrote {out}")


@bench_app.command("loader")
def bench_loader(
    iters: int = typer.Option(200),
    warmup: int = typer.Option(20),
    device: str = DEVICE,
    loaders: str = BENCH_LOADERS,
    data_dir: Optional[Path] = BENCH_DATA,
    out: Path = typer.Option(Path("bench/loader.json")),
) -> None:
    """Images/s each loader delivers, augmented, on the device."""
    from .tools.bench import format_table, run_loader_bench, write_report

    with bad_input(DataError, RuntimeError, ValueError):
        report = run_loader_bench(iters, warmup, device, _split(loaders), data_dir)
    write_report(report, out)
    typer.echo(f"{format_table(report)}\n\nwrote {out}")


@app.command()
def report(
    run_dirs: list[Path] = RUN_DIRS,
    out: Optional[Path] = typer.Option(None, help="where to write report.md, figure6.png, figure7.png, curves/ (default: the first RUN_DIR)"),
    title: str = typer.Option("", help="heading of report.md and the figure (say which data the runs used)"),
) -> None:
    """Error table vs the paper's Table 6, Figure 6-style curves, Figure 7 (layer responses), one curve figure per run."""
    from .suite.report import ReportError, write_report

    with bad_input(ReportError):
        written = write_report(run_dirs, out, title)
    for note in written["skipped"]:
        typer.echo(f"skipped: {note}", err=True)
    for note in written["warnings"]:
        typer.echo(f"warning: {note}", err=True)
    typer.echo(written["markdown"])
    figure7 = f", {written['figure7']}" if written["figure7"] else ""
    typer.echo(f"wrote {written['report']}, {written['figure']}{figure7} and {len(written['curves'])} curve figure(s) "
               f"from {written['runs']} run(s)")


@app.command("export")
def export_(
    checkpoint: Path = WEIGHTS,
    format: str = typer.Option(..., "--format", "-f", help="safetensors | onnx"),
    out: Optional[Path] = typer.Option(None, help="output file (default: the checkpoint with .safetensors / .onnx)"),
    data_dir: Optional[Path] = typer.Option(None, help="only for old checkpoints without a stored mean image"),
    as_json: bool = JSON_RESULT,
) -> None:
    """Weights for use without this package: safetensors or ONNX (checked with onnxruntime), plus <name>.mean.npy."""
    from .tools.export import describe, export

    show_weights_result(export, checkpoint, describe, as_json, format, out, data_dir)


@app.command()
def reproduce(
    depths: str = typer.Option("20,32,44,56", help="comma-separated depths, each 6n+2"),
    plain: bool = typer.Option(True, "--plain/--resnet", help="the plain nets beside the ResNets (Figure 6's comparison), or the ResNets alone"),
    no_plain: bool = typer.Option(False, "--no-plain", hidden=True, help="the same as --resnet (its older name)"),
    seeds: int = typer.Option(1, help="seeds 0..K-1 of every net"),
    gpus: Optional[str] = typer.Option(None, help="GPU ids, e.g. 0,1,2,3 (default: all visible)"),
    runs_per_gpu: int = typer.Option(1, help="runs sharing each GPU at a time, as separate processes"),
    pack: int = typer.Option(1, help="up to K seeds of each net trained in one process as one fused model (train --seeds; docs/suite.md)"),
    out: Path = typer.Option(Path("runs"), help="one folder per run inside, and the report"),
    iters: Optional[int] = typer.Option(None, help="iterations per run (default: the paper's 64k); milestones scale"),
    data_dir: Optional[Path] = DATA_DIR,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="base TOML for every run"),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value for every run, repeatable"),
    device: Optional[Device] = RUN_DEVICE,
    launcher: Launcher = typer.Option("local", help="local (this machine) or slurm (one job array)"),
    partition: str = typer.Option("", help="slurm: partition"),
    account: str = typer.Option("", help="slurm: account"),
    time_limit: str = typer.Option("", "--time", help="slurm: time limit per array task, e.g. 04:00:00"),
    gpus_per_task: int = typer.Option(1, help="slurm: GPUs per array task (0: CPU only)"),
    runs_per_task: int = typer.Option(1, help="slurm: runs (with --pack: packs) per array task, side by side on its GPUs"),
    sbatch_args: list[str] = typer.Option([], "--sbatch-arg", help="slurm: one more sbatch option, e.g. --sbatch-arg=--mem=8G"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="slurm: wait for the array and write the report"),
    dry_run: bool = typer.Option(False, help="slurm: print the job array script, submit nothing"),
    poll_s: float = typer.Option(10.0, help="slurm: seconds between queue polls while waiting"),
    status: Optional[Path] = typer.Option(None, help="show where the suite in this folder stands, and exit"),
    as_json: bool = typer.Option(False, "--json", help="with --status: the states as JSON"),
) -> None:
    """Train the whole suite (depths x ResNet/plain x seeds), resumable, then write the report."""
    from .suite.reproduce import interrupted, parse_ints, reproduce as run_suite

    if status is not None:
        from .suite.slurm import show_status

        with bad_input(ConfigError):
            return show_status(status, as_json, echo=typer.echo)
    plain, device = plain and not no_plain, _value(device)
    schedule = None
    if launcher == Launcher.slurm:
        from functools import partial

        from .suite.slurm import SlurmOptions, run_suite as slurm_suite

        if gpus or runs_per_gpu != 1:
            fail("--gpus and --runs-per-gpu are for the local launcher; on Slurm use --gpus-per-task and "
                 "--runs-per-task")
        opts = SlurmOptions(partition, account, time_limit, gpus_per_task, runs_per_task, pack, list(sbatch_args),
                            wait, dry_run, poll_s)
        schedule = partial(slurm_suite, out=out, opts=opts, echo=typer.echo)
    elif dry_run or not wait:
        fail("--dry-run and --no-wait are for --launcher slurm")
    try:
        with bad_input(ConfigError):
            outcomes, _ = run_suite(parse_ints(depths, "--depths"), plain, seeds, out, gpus, iters, overrides,
                                    config, data_dir, device, runs_per_gpu, schedule, echo=typer.echo, pack=pack)
    except KeyboardInterrupt:  # a Ctrl-C while planning or writing the report (the runs' own is handled there)
        fail("interrupted; run the same command again to resume", code=INTERRUPTED)
    if interrupted(outcomes):  # Ctrl-C or SIGTERM: the runs stopped at a checkpoint, the suite is unfinished
        raise typer.Exit(INTERRUPTED)
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(FAILED)


@app.command()
def runs(
    run_dirs: list[Path] = RUN_DIRS,
    as_json: bool = typer.Option(False, "--json", help="the states as JSON"),
) -> None:
    """Where each run stands: running (host, pid, iteration, time left), interrupted or stopped
    (resumes from), done (test error), failed (exit code, the log's last line), not started."""
    from .suite.discover import ReportError, find_runs  # finding run folders: the report's rule
    from .suite.status import run_status, table, to_json

    with bad_input(ReportError):
        found, _ = find_runs(run_dirs)
    if not found:
        fail(f"no run folders in {', '.join(map(str, run_dirs))} (a run folder holds config.toml, "
             f"metrics.jsonl or summary.json)")
    statuses = [run_status(path) for path in found]
    typer.echo(to_json(statuses) if as_json else table(statuses))


@app.command()
def doctor(
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    data_dir: Optional[Path] = typer.Option(None, help="CIFAR-10 folder to look for (default: the download cache)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    steps: int = typer.Option(6, help="K: steps per comparison"),
    skip: str = typer.Option("", help="comma-separated checks (or their first word) to leave out, e.g. compile"),
    compile_timeout: float = typer.Option(180.0, help="seconds the compile check may take (a child process, ended after)"),
) -> None:
    """Will this machine run resnetdist correctly and fast? Versions, GPUs, packages, data, then
    checks on the device (graph vs eager, compile, evaluation, checkpoints, speed), and under
    torchrun the distributed ones. Exit 1 on any failure."""
    from .dist import launch_rank
    from .tools.doctor import format_table, run_doctor

    if compile_timeout <= 0:
        fail(f"--compile-timeout must be more than 0 seconds, got {compile_timeout:g}")
    with bad_input(RuntimeError):  # e.g. --device cuda without a GPU
        report = run_doctor(device, data_dir, steps, set(_split(skip)), compile_timeout)
    if launch_rank() == 0:
        typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    if not report["ok"]:
        raise typer.Exit(FAILED)


def main() -> None:
    """Errors nobody anticipated (bugs) end as one line too, as in a torchrun log with one
    line per worker; RESNETDIST_DEBUG=1 prints the plain traceback instead."""
    try:
        app()
    except Exception as e:
        if os.environ.get("RESNETDIST_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            typer.echo(f"error: {type(e).__name__}: {first} (unexpected; RESNETDIST_DEBUG=1 shows the traceback)",
                       err=True)
        sys.exit(1)
