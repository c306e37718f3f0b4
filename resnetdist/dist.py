"""torch.distributed under torchrun, in the nanoGPT manner: RANK / LOCAL_RANK / WORLD_SIZE,
the device, the process group (NCCL on CUDA, gloo on CPU); without torchrun, world size 1.

A rank that stops answering (hung, SIGSTOPped, dead, its NIC gone) leaves the others waiting
in their next collective. Every wait on other ranks runs inside `stage("what")`, and the
first of two things ends it:
- the hang watchdog (HangWatch, `dist.hang_timeout_s`): a thread on every rank that sees the
  run's progress and, when a stage has had none for that long, reports one line (rank, host,
  iteration, stage) and exits 7 (`setup(on_hang="raise")`: PeerLost in the main thread). It
  also sees collectives replayed inside a CUDA graph, which no NCCL or process-group timeout does;
- the process group's timeout (`dist.timeout_s`) on eager collectives: gloo raises and `stage`
  turns it into one PeerLost (exit 7); NCCL's own watchdog aborts the process. hang_timeout_s
  is kept below it (config), so the watchdog's one line comes first.
Either way torchrun's agent (`--max-restarts`) stops the others (SIGTERM, then SIGKILL: a
SIGSTOPped worker only goes with that) and restarts the group from the newest checkpoint.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import PeerLost

ON_HANG = ("exit", "raise")  # setup(on_hang=): what the hang watchdog does when it fires


# what gloo (and torch's c10d) say when a peer is gone or silent; NCCL names itself
PEER_FAILURE_MARKERS = ("Timed out", "timed out", "timeout", "Connection closed", "Connection reset",
                        "pair closure", "Broken pipe", "NCCL", "gloo")

_timeout_s: int | None = None  # the process group's, for messages

# NCCL's watchdog on eager collectives: 1 = on a timeout or error, abort and end the process.
# Set in the worker, the one place every launcher reaches (torchrun's agent overwrites its own
# environment's value). Safe with CUDA graphs: work enqueued during capture is not handed to the
# watchdog (PyTorch >= 2.2) and the capture runs in thread_local error mode (training/graph.py);
# 0, as once for graph runs, left a hung peer stalling the job forever.
NCCL_ASYNC_ERROR_HANDLING = "1"
# NCCL's heartbeat monitor (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, 480 s by default) ends a process
# whose watchdog thread is stuck on the device: kept this far above dist.timeout_s, never first
NCCL_HEARTBEAT_MARGIN_S = 60


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# what torchrun told this process, known before any process group: the only reads of RANK,
# LOCAL_RANK and WORLD_SIZE in the package
def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    """This process's rank as launched (0 alone, and for a launcher that starts torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_torchrun() -> bool:
    """Was this process started by torchrun (a rank), rather than by a person?"""
    return "LOCAL_RANK" in os.environ


def device_for(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_pref: str, timeout_s: int, hang_timeout_s: int = 0, *, compile_pause_s: float = 1200,
          on_hang: str = "exit") -> DistContext:
    """This rank's context; the process group when there are several ranks; the hang watchdog
    when hang_timeout_s > 0 (also for one process: a stuck device ends it too). on_hang: "exit"
    (one line, exit 7: a worker under torchrun) or "raise" (PeerLost in the main thread, for a
    caller that must outlive the run, e.g. a notebook)."""
    global _timeout_s
    if on_hang not in ON_HANG:
        raise ValueError(f"on_hang must be one of {ON_HANG}, got {on_hang!r}")
    rank, local, world_size = launch_rank(), local_rank(), world_size_from_env()
    device = device_for(device_pref, local)
    if hang_timeout_s > 0:
        HangWatch.start(hang_timeout_s, rank, compile_pause_s=compile_pause_s, on_hang=on_hang)
    if world_size > 1 and not dist.is_initialized():
        _timeout_s = timeout_s
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_ASYNC_ERROR_HANDLING  # read at the group's creation
        os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(max(480, timeout_s + NCCL_HEARTBEAT_MARGIN_S)))
        # with device_id, NCCL's communicators are made here, eagerly: a rank that never comes
        # leaves the others in a call no process-group timeout bounds, so it is watched
        with stage("process-group init (every rank's communicator)", early=True):
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
    return DistContext(rank, local, world_size, device)


def cleanup() -> None:
    """The end of this rank's run: the process group destroyed (watched: NCCL's teardown can
    wait on a peer), then the hang watchdog stopped."""
    try:
        if dist.is_initialized():
            with stage("teardown (process group destroyed)", early=True):
                dist.destroy_process_group()
    finally:
        HangWatch.stop()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def distributed() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


@contextmanager
def stage(what: str, *, early: bool = False, extra_s: float = 0.0) -> Iterator[None]:
    """Collectives of one stage of the run: the hang watchdog is armed for it, and their failure
    becomes a PeerLost, both naming it. Cheap: it wraps whole chunks of steps. early: watched
    before the first iteration too (init, teardown, the finish); extra_s: seconds it may be
    silent beyond dist.hang_timeout_s (the finish's W&B upload has its own limit)."""
    watch = HangWatch.current
    if watch is not None:
        watch.enter(what, early, extra_s)
    try:
        yield
    except RuntimeError as e:
        peer_failure = isinstance(e, dist.DistError) or any(m in str(e) for m in PEER_FAILURE_MARKERS)
        if not dist.is_initialized() or isinstance(e, PeerLost) or not peer_failure:
            raise
        raise PeerLost(f"rank {dist.get_rank()}: the {what} failed: another rank stopped answering within "
                       f"dist.timeout_s={_timeout_s} s or died (hung, stopped or killed); {restart_hint()}. "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        if watch is not None:
            watch.leave()


def progress(iteration: int | None = None) -> None:
    """The run moved on (the feed hands out the batch after `iteration` iterations, an evaluation
    batch is done): the hang watchdog's clock starts again. Cheap enough per step."""
    watch = HangWatch.current
    if watch is not None:
        watch.beat(iteration)


def restart_hint() -> str:
    """What happens next, from the TORCHELASTIC_* variables torchrun's agent sets in every worker."""
    max_restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    if max_restarts is None:
        return ("not under torchrun, so nothing restarts it: run the same command again to resume from the newest "
                "checkpoint")
    restarts, done = int(max_restarts), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if done < restarts:
        return f"torchrun restarts the job from the newest checkpoint (restart {done + 1} of --max-restarts {restarts})"
    if restarts == 0:
        return ("restarts are off (--max-restarts 0), so the job ends here: run the same command again to resume from "
                "the newest checkpoint, and pass --max-restarts N (launch scripts: MAX_RESTARTS=N) to have torchrun "
                "restart it by itself")
    return f"torchrun's restarts are used up ({done} of --max-restarts {restarts}): the job ends here"


class HangWatch:
    """The hang watchdog: one daemon thread per process, armed while the main thread is inside a
    stage; a stage without progress (`progress`, stage entries and exits) for `timeout_s` is
    reported in one line and ends the process with exit 7 (on_hang="raise": PeerLost raised in
    the main thread).

    Why a healthy run cannot trip it: progress is every iteration (under a second on a GPU, a
    few on a CPU), every evaluation batch, the end of rank 0's checkpoint write (a stage of its
    own); compilation pauses the clock for at most `compile_pause_s`. Stages are watched from
    the first completed iteration on, except early ones (init, finish, teardown): other set-up
    waits are eager collectives the group's timeout covers, and a cold start is not silence.
    A blocked main thread leaves this thread running (torch releases the GIL)."""

    current: HangWatch | None = None
    compile_hooked = False
    REPORT_WAIT_S = 2.0  # fire(): the report's wait, at most (an unread stderr pipe must not hold the exit)

    def __init__(self, timeout_s: float, rank: int, compile_pause_s: float = 1200, on_hang: str = "exit"):
        self.timeout_s, self.rank, self.host = timeout_s, rank, socket.gethostname()
        self.compile_pause_s, self.on_hang = compile_pause_s, on_hang
        self.main_thread = threading.main_thread().ident
        self.stages: list[tuple[str, bool, float]] = []  # (what, early, extra_s)
        self.last = time.monotonic()
        self.iteration: int | None = None  # iterations done when the feed last handed one out
        self.armed = False  # an iteration has completed (the feed handed out a second one)
        self.compiling_since: float | None = None
        self.stopped = False
        threading.Thread(target=self.watch, name="resnetdist-hang-watch", daemon=True).start()

    @classmethod
    def start(cls, timeout_s: float, rank: int, compile_pause_s: float = 1200, on_hang: str = "exit") -> HangWatch:
        """The process's watchdog (a second call in the same run keeps the first)."""
        if cls.current is None:
            cls.current = cls(timeout_s, rank, compile_pause_s, on_hang)
        return cls.current

    @classmethod
    def stop(cls) -> None:
        """The run is over (a process may hold several, e.g. tests in one process): its thread ends."""
        if cls.current is not None:
            cls.current.stopped = True
            cls.current = None

    def beat(self, iteration: int | None = None) -> None:
        self.last = time.monotonic()
        if iteration is not None:
            self.armed = self.armed or (self.iteration is not None and iteration != self.iteration)
            self.iteration = iteration

    def enter(self, what: str, early: bool = False, extra_s: float = 0.0) -> None:
        self.stages.append((what, early, extra_s))
        self.beat()

    def leave(self) -> None:
        self.stages.pop()
        self.beat()

    @classmethod
    def count_compiling_as_progress(cls) -> None:
        """torch.compile's compilation pauses the current watchdog's clock (at most its
        compile_pause_s); hooked once per process."""
        if cls.compile_hooked:
            return
        try:
            from torch._dynamo.callback import on_compile_end, on_compile_start
        except ImportError:  # a torch without compile callbacks: compilation counts as silence
            return
        on_compile_start(lambda *_: cls._compiling(True))
        on_compile_end(lambda *_: cls._compiling(False))
        cls.compile_hooked = True

    @classmethod
    def _compiling(cls, now: bool) -> None:
        watch = cls.current
        if watch is not None:
            watch.compiling_since = time.monotonic() if now else None
            watch.beat()

    def stalled_for(self) -> float:
        """Seconds the current stage has gone without progress beyond its allowance; 0 unwatched."""
        if not self.stages:
            return 0.0
        _, early, extra_s = self.stages[-1]
        if not (self.armed or early):
            return 0.0
        silent = time.monotonic() - self.last
        if self.compiling_since is not None:
            silent -= min(time.monotonic() - self.compiling_since, self.compile_pause_s)
        return max(0.0, silent - extra_s)

    def watch(self) -> None:
        while not self.stopped:
            time.sleep(min(1.0, self.timeout_s / 10))
            if not self.stopped and self.stalled_for() > self.timeout_s:
                self.fire()
                return

    def fire(self) -> None:
        """Report the hang and end the wait: the process (exit 7), or the main thread's call
        (on_hang="raise"). The report is written by a thread of its own, waited for at most
        REPORT_WAIT_S: the exit never blocks on output."""
        line = hang_report(self)
        writer = threading.Thread(target=lambda: (print(line, file=sys.stderr, flush=True), sys.stdout.flush()),
                                  name="resnetdist-hang-report", daemon=True)
        writer.start()
        writer.join(self.REPORT_WAIT_S)
        if self.on_hang == "exit":
            os._exit(PeerLost.exit_code)  # the main thread is blocked: only the process can end it
        self.stopped = True
        if HangWatch.current is self:
            HangWatch.current = None
        raise_in_main_thread(self.main_thread, line)


def raise_in_main_thread(thread_id: int, line: str) -> None:
    """PeerLost(line) raised in the main thread at its next Python instruction (a blocked C call:
    once it returns). A collective blocked in NCCL returns (with an error) only when its
    communicators are aborted; gloo's return at dist.timeout_s (NCCL's too, on a torch without
    the call)."""
    import ctypes

    error = type("PeerHang", (PeerLost,), {"__init__": lambda e: PeerLost.__init__(e, line)})
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(error))
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.is_initialized():
        try:
            abort()
        except Exception:  # noqa: BLE001 - best effort: the PeerLost is raised either way
            pass


def hang_report(watch: HangWatch) -> str:
    """The watchdog's one line: rank, host, iteration, the stage, what happens next."""
    it = "before its first iteration" if watch.iteration is None else f"after iteration {watch.iteration}"
    what = watch.stages[-1][0] if watch.stages else "?"
    compiling = (f" (compiling for longer than dist.compile_pause_s={watch.compile_pause_s:g} s)"
                 if watch.compiling_since is not None else "")
    ending = f"raising PeerLost ({PeerLost.exit_code})" if watch.on_hang == "raise" else f"exiting {PeerLost.exit_code}"
    return (f"error: rank {watch.rank} on {watch.host}: no progress for {watch.timeout_s:g} s "
            f"(dist.hang_timeout_s) {it}, waiting in the {what}{compiling}: another rank hung, was stopped or "
            f"died, or this rank's device is stuck; {ending}: {restart_hint()}")


def all_reduce_max(value: int) -> int:
    """The largest of the ranks' values (this one's alone when not distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) copied in place into every rank's model: the ranks'
    statistics drift apart between DDP's per-forward broadcasts, and after this every rank
    evaluates rank 0's model, the one model.pt saves. In place, so a captured graph still points
    at them (DDP broadcasts from rank 0 at the next forward anyway: training is unchanged)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value, in rank order ([obj] when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
