"""`resnetdist doctor`: will this machine run resnetdist correctly, and fast? (docs/gpu-acceptance.md)

Rows of (section, name, ok / fail / skip / info, detail, seconds) in three sections: the
environment (versions, GPUs, packages, data); device checks on this rank's device, in one
process before any process group exists, so none waits for another rank (graph against eager
across an lr milestone, compile against eager, evaluation between steps, a checkpoint into a
built step, a speed sample); under torchrun, the distributed ones (all-reduce, identical
weights after DDP steps, bandwidth). The steps run on a small synthetic set through the
trainer's own build, so what passes here is what trains.
"""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from .. import dist
from .bench import ffcv_state, stepping, sync, timed
from ..config import load_config
from ..data import load_data
from ..data.cifar import IDENTITY_WORDS, DataError, identity, locate, write_synthetic
from ..training import build, take_steps

NEEDS_CUDA = "skipped: needs CUDA"


@dataclass
class Row:
    section: str
    name: str
    status: str  # ok | fail | skip | info
    detail: str
    seconds: float = 0.0


def check(section: str, name: str, fn: Callable[[], tuple[str, str]]) -> Row:
    """Run one check; an exception is a failure naming it, not a crash of the doctor."""
    t0 = time.perf_counter()
    try:
        status, detail = fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        status, detail = "fail", f"{type(e).__name__}: {str(e).strip()[:300]}"
    return Row(section, name, status, detail, time.perf_counter() - t0)


# ----- environment ------------------------------------------------------------------------------


def _present(module: str) -> str:
    return "present" if importlib.util.find_spec(module) is not None else "absent"


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def _gpus() -> str:
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return "; ".join(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB" for i, p in enumerate(props))


def _data(data_dir: Path | None) -> tuple[str, str]:
    try:
        folder = locate(data_dir, download_ok=False)
        found = identity(folder)  # "ok" only for the official files: a stand-in trains, but is not CIFAR-10
        return ("ok" if found == "cifar10" else "info"), f"{folder} ({IDENTITY_WORDS[found]})"
    except DataError as e:
        return "info", f"not found ({e}); `resnetdist train` downloads it, or pass --data-dir"


def environment_rows(data_dir: Path | None) -> list[Row]:
    cuda = torch.cuda.is_available()
    facts: list[tuple[str, Callable[[], str]]] = [
        ("python", lambda: f"{platform.python_version()} ({sys.executable})"),
        ("torch", lambda: torch.__version__),
        ("CUDA", lambda: f"{torch.version.cuda} (available: {cuda})"),
        ("cuDNN", lambda: str(torch.backends.cudnn.version()) if cuda else "n/a"),
        ("NCCL", lambda: ".".join(map(str, torch.cuda.nccl.version())) if cuda else "n/a"),
        ("driver", _driver),
        ("GPUs", lambda: _gpus() if cuda else "none"),
        ("bf16", lambda: str(torch.cuda.is_bf16_supported()) if cuda else "n/a (CPU runs fp32)"),
        ("FFCV", ffcv_state),
        ("W&B", lambda: _present("wandb")),
        ("TensorBoard", lambda: _present("torch.utils.tensorboard") if _present("tensorboard") == "present" else "absent"),
        ("tomli-w", lambda: _present("tomli_w").replace("absent", "absent (a built-in writer stands in)")),
    ]
    return ([check("environment", name, lambda fn=fn: ("info", fn())) for name, fn in facts]
            + [check("environment", "data", lambda: _data(data_dir))])


# ----- one step, driven -------------------------------------------------------------------------


class Trial:
    """A trainer's step on the synthetic set: `run(count, first)` feeds it iterations
    first .. first+count-1, as the training loop does."""

    def __init__(self, data_dir: Path, device: torch.device, kind: str, precision: str = "fp32", n: int = 1,
                 batch: int = 32, ctx: dist.DistContext | None = None, **optim: Any):
        self.cfg = load_config(flags={
            "model": {"n": n}, "data": {"dir": str(data_dir), "eval_batch": 200},
            "optim": {"batch_size": batch, **optim},
            "train": {"device": device.type, "precision": precision, "step": kind},
            "log": {"wandb_mode": "disabled", "tensorboard": False},
        })
        self.trainer = build(self.cfg, ctx or dist.DistContext(0, 0, 1, device), load_data(self.cfg.data))
        self.model, self.optimizer, self.step = self.trainer.model, self.trainer.optimizer, self.trainer.step

    def run(self, count: int, first: int = 0) -> None:
        """Iterations first .. first+count-1 of the step, nothing else."""
        take_steps(self.step, self.trainer.feed.batches(first), count)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def max_difference(a: Trial, b: Trial) -> float:
    return max((x.double() - y.double()).abs().max().item()
               for x, y in zip(a.weights().values(), b.weights().values()) if x.is_floating_point())


@contextmanager
def deterministic_cudnn():
    """For the checks that compare two separately built (captured) trials: cuDNN may pick backward
    kernels that accumulate with atomics, so two runs of the same code differ in the last bits,
    and over steps by more. With cudnn.deterministic, cudnn.benchmark (on: make_model) picks among
    deterministic kernels only and the second trial reuses the first one's picks (the cache is
    per process), as tests/test_step.py's deterministic_cudnn does."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = saved


# two CUDA trials of the same steps agree within this (max abs weight difference): cuBLAS and
# BN's reductions promise no bitwise equality across two captures or streams
CUDA_TOLERANCE = 1e-4


def _same(a: Trial, b: Trial, device: torch.device) -> tuple[bool, float]:
    """Bitwise on the CPU; on CUDA within CUDA_TOLERANCE, the trials built and run under
    deterministic_cudnn (the tolerance is a margin: with deterministic kernels they agree to the
    last bits or nearly, where autotuned atomics could drift apart over the steps)."""
    diff = max_difference(a, b)
    return (diff == 0.0 if device.type == "cpu" else diff <= CUDA_TOLERANCE), diff


# ----- device checks ----------------------------------------------------------------------------


def graph_vs_eager(data_dir: Path, device: torch.device, steps: int) -> tuple[str, str]:
    """K graphed steps against K eager steps, fp32, the lr crossing a milestone mid-way: the
    lr inside the graph must change with no re-capture."""
    if device.type != "cuda":
        return "skip", NEEDS_CUDA
    milestone = max(1, steps // 2)
    eager = Trial(data_dir, device, "eager", iters=64, milestones=[milestone])
    graph = Trial(data_dir, device, "graph", iters=64, milestones=[milestone])  # by name: a failed capture raises
    for t in (eager, graph):
        t.run(steps)
    lr, diff = graph.step.lr.item(), max_difference(eager, graph)
    ok = abs(lr - 0.01) < 1e-9 and diff <= 1e-3
    return ("ok" if ok else "fail"), f"{steps} steps, milestone at {milestone}: lr {lr:g}, max abs weight diff {diff:.2e}"


COMPILE_TIMEOUT_S = 180  # a cold torch.compile of ResNet-8 takes ~20-60 s; a hung one must not hold the doctor


def compile_bounded(data_dir: Path, device: torch.device, steps: int,
                    timeout_s: float = COMPILE_TIMEOUT_S) -> tuple[str, str]:
    """compile_vs_eager in a child process (spawned: CUDA and compile state of its own), ended
    if it takes longer than timeout_s: a compile cannot be interrupted from inside."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_compile_child, args=(str(data_dir), str(device), steps, results), daemon=True)
    child.start()
    try:
        return results.get(timeout=timeout_s)
    except queue.Empty:
        return "fail", (f"torch.compile did not finish within {timeout_s:g} s (--compile-timeout); the compile "
                        f"step would take as long to start")
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=30)


def _compile_child(data_dir: str, device: str, steps: int, results) -> None:
    row = check("device", "compile_vs_eager", lambda: compile_vs_eager(Path(data_dir), torch.device(device), steps))
    results.put((row.status, row.detail))


def compile_vs_eager(data_dir: Path, device: torch.device, steps: int) -> tuple[str, str]:
    """One compiled step against one eager step (float reordering only)."""
    eager, compiled = Trial(data_dir, device, "eager"), Trial(data_dir, device, "compile")
    for t in (eager, compiled):
        t.run(1)
    diff = max_difference(eager, compiled)
    return ("ok" if diff <= 1e-4 else "fail"), f"1 step: max abs weight diff {diff:.2e}"


def evaluation_between_steps(data_dir: Path, device: torch.device, steps: int) -> tuple[str, str]:
    """An evaluation between steps (replays, on CUDA) changes nothing the step trains with."""
    with deterministic_cudnn():
        plain, evaluated = Trial(data_dir, device, "auto"), Trial(data_dir, device, "auto")  # the default step
        for t in (plain, evaluated):
            t.run(steps)
        errors = evaluated.trainer.evaluate()[0]
        for t in (plain, evaluated):
            t.run(steps, first=steps)
    same, diff = _same(plain, evaluated, device)
    ok = same and evaluated.model.training and not evaluated.step.choice.fell_back
    return ("ok" if ok else "fail"), (f"{evaluated.step.kind}: test error {errors['test_error']:.1f}% between "
                                      f"steps; max abs weight diff {diff:.2e}")


def checkpoint_round_trip(data_dir: Path, device: torch.device, steps: int) -> tuple[str, str]:
    """A checkpoint (through torch.save / torch.load) loaded into a step already built (a
    captured graph, on CUDA) continues as the run it came from, and every momentum buffer
    keeps its address."""
    with deterministic_cudnn():
        source, target = Trial(data_dir, device, "auto"), Trial(data_dir, device, "auto")  # the default step
        source.run(steps)
        buf = io.BytesIO()
        torch.save({"model": source.weights(), "optimizer": source.optimizer.state_dict()}, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        ptrs = [s["momentum_buffer"].data_ptr() for s in target.optimizer.state.values()]
        target.step.load_state(state["model"], state["optimizer"], steps)
        kept = ptrs == [s["momentum_buffer"].data_ptr() for s in target.optimizer.state.values()]
        for t in (source, target):
            t.run(steps, first=steps)
    same, diff = _same(source, target, device)
    ok = kept and same and int(target.step.it) == 2 * steps
    return ("ok" if ok else "fail"), (f"{target.step.kind}: buffers kept in place: {kept}; after {steps} more "
                                      f"steps max abs weight diff {diff:.2e}")


def ms_per_iter(trial: Trial, iters: int, warmup: int) -> float:
    return 1000 * timed(stepping(trial.trainer), warmup, iters, trial.step.device)[1] / iters


SPEED_WARMUP, SPEED_ITERS = 15, 100


def speed_sample(data_dir: Path, device: torch.device, steps: int) -> tuple[str, str]:
    """ms/iter of ResNet-20 at batch 128: eager against graph (bf16) on CUDA; eager (n=1,
    batch 32) on a CPU. A sample, not a benchmark: `resnetdist bench` is that. On CUDA the
    sample runs on a set large enough for one epoch to hold every timed step: an epoch
    boundary uploads the next order (a blocking copy) and would understate the graph."""
    if device.type != "cuda":
        return "info", f"eager fp32, ResNet-8, batch 32: {ms_per_iter(Trial(data_dir, device, 'eager'), 5, 1):.1f} ms/iter"
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    with tempfile.TemporaryDirectory(prefix="resnetdist-doctor-speed-") as scratch:
        one_epoch = write_synthetic(Path(scratch), speed_set_per_file(128), 200)
        times = {kind: ms_per_iter(Trial(one_epoch, device, kind, precision, n=3, batch=128), SPEED_ITERS, SPEED_WARMUP)
                 for kind in ("eager", "graph")}
    return "info", (f"ResNet-20 {precision} batch 128: eager {times['eager']:.2f} ms/iter, graph "
                    f"{times['graph']:.2f} ms/iter ({times['eager'] / times['graph']:.1f}x)")


def speed_set_per_file(batch: int) -> int:
    """Records per training file (5 files) so that warm-up and timed steps fit in one epoch."""
    return -(-(SPEED_WARMUP + SPEED_ITERS + 1) * batch // 5)


DEVICE_CHECKS = {
    "graph_vs_eager": graph_vs_eager,
    "compile_vs_eager": compile_bounded,
    "evaluation_between_steps": evaluation_between_steps,
    "checkpoint_into_built_step": checkpoint_round_trip,
    "speed_sample": speed_sample,
}


def device_rows(data_dir: Path, device: torch.device, steps: int, skip: set[str], compile_timeout_s: float) -> list[Row]:
    rows = []
    for name, fn in DEVICE_CHECKS.items():
        if name in skip or name.split("_")[0] in skip:
            rows.append(Row("device", name, "skip", "skipped: --skip"))
            continue
        fn = partial(compile_bounded, timeout_s=compile_timeout_s) if fn is compile_bounded else fn
        rows.append(check("device", name, lambda fn=fn: fn(data_dir, device, steps)))
    return rows


# ----- distributed checks (under torchrun) ------------------------------------------------------


def all_reduce_correct(ctx: dist.DistContext) -> tuple[str, str]:
    t = torch.full((1024,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce_sum(t)
    want = ctx.world_size * (ctx.world_size + 1) / 2
    ok = bool((t == want).all())
    return ("ok" if ok else "fail"), f"{ctx.world_size} ranks: sum {t[0].item():g}, expected {want:g}"


def ddp_weights_identical(ctx: dist.DistContext, data_dir: Path, steps: int) -> tuple[str, str]:
    """K DDP steps of the default step (graph on CUDA: DDP captured inside it), then rank 0's
    parameters broadcast and compared bitwise on every rank. (BN running statistics are left
    out: each rank updates them from its own shard of the batch, by design; evaluation
    broadcasts rank 0's.)"""
    trial = Trial(data_dir, ctx.device, "auto", ctx=ctx, batch=32 * ctx.world_size)
    trial.run(steps)
    sync(ctx.device)
    mismatched = 0
    for w in trial.model.parameters():
        ref = w.detach().clone()
        torch.distributed.broadcast(ref, src=0)
        mismatched += int(not torch.equal(ref, w))
    total = dist.all_reduce_sum(torch.tensor([float(mismatched)], device=ctx.device)).item()
    return ("ok" if total == 0 else "fail"), (f"{trial.step.kind}, {steps} steps: {int(total)} parameter(s) "
                                              f"differ from rank 0's")


def all_reduce_bandwidth(ctx: dist.DistContext) -> tuple[str, str]:
    """Bus bandwidth of an fp32 all-reduce (nccl-tests' definition: 2(n-1)/n x bytes / time)."""
    numel = (64 if ctx.device.type == "cuda" else 4) * 2**20 // 4
    t = torch.ones(numel, device=ctx.device)
    _, seconds, _ = timed(lambda count: [dist.all_reduce_sum(t) for _ in range(count)], 3, 10, ctx.device)
    seconds /= 10
    bus = 2 * (ctx.world_size - 1) / ctx.world_size * numel * 4 / seconds / 1e9
    return "info", f"{numel * 4 / 2**20:.0f} MiB: {1000 * seconds:.2f} ms, bus bandwidth {bus:.2f} GB/s"


def distributed_rows(ctx: dist.DistContext, data_dir: Path, steps: int, local_failures: int) -> list[Row]:
    failed_ranks = dist.all_reduce_sum(torch.tensor([float(local_failures > 0)], device=ctx.device)).item()
    return [Row("distributed", "device_checks_on_every_rank", "ok" if failed_ranks == 0 else "fail",
                f"{int(failed_ranks)} of {ctx.world_size} rank(s) failed a device check"),
            check("distributed", "all_reduce", lambda: all_reduce_correct(ctx)),
            check("distributed", "ddp_weights_identical", lambda: ddp_weights_identical(ctx, data_dir, steps)),
            check("distributed", "all_reduce_bandwidth", lambda: all_reduce_bandwidth(ctx))]


# ----- the command ------------------------------------------------------------------------------


def run_doctor(device_pref: str = "auto", data_dir: Path | None = None, steps: int = 6,
               skip: set[str] = frozenset(), compile_timeout_s: float = COMPILE_TIMEOUT_S) -> dict[str, Any]:
    """Every check on this rank; under torchrun the distributed ones too. The device checks run
    before the process group exists, so a rank's own checks never wait for another rank."""
    rows = environment_rows(data_dir)
    device = dist.device_for(device_pref, dist.local_rank())
    with tempfile.TemporaryDirectory(prefix="resnetdist-doctor-") as scratch:
        synthetic = write_synthetic(Path(scratch), 128, 200)
        rows += device_rows(synthetic, device, steps, set(skip), compile_timeout_s)
        if dist.world_size_from_env() > 1:
            ctx = dist.setup(device_pref, timeout_s=300)
            try:
                rows += distributed_rows(ctx, synthetic, steps, sum(r.status == "fail" for r in rows))
            finally:
                dist.cleanup()
    return {"device": str(device), "world_size": dist.world_size_from_env(), "ok": not any(r.status == "fail" for r in rows),
            "checks": [asdict(r) for r in rows]}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"resnetdist doctor on {report['device']} ({report['world_size']} rank(s))", "",
             "| section | check | status | detail | s |", "|---|---|---|---|---|"]
    for r in report["checks"]:
        status = r["status"].upper() if r["status"] == "fail" else r["status"]
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['section']} | {r['name']} | {status} | {detail} | {r['seconds']:.1f} |")
    lines += ["", "all checks passed" if report["ok"] else "FAILED: see the rows marked FAIL"]
    return "\n".join(lines)
