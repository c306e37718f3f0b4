"""torch.distributed under torchrun, in the nanoGPT manner: read RANK / LOCAL_RANK /
WORLD_SIZE, pick the device, init the process group (NCCL on CUDA, gloo on CPU). Without
torchrun the same code runs as one process with world size 1.

A rank that stops answering (hung, SIGSTOPped, dead, its NIC gone with the process alive)
leaves the others waiting in their next collective. Every wait on other ranks runs inside
`stage("what")`, and two things end such a wait, whichever comes first:

- the hang watchdog (HangWatch, `dist.hang_timeout_s`): a host thread on every rank that sees
  the run's progress (stage entries and exits, every iteration the feed hands out, every
  evaluation batch, compilation) and, when a stage has had none for that long, prints one line
  naming rank, host, iteration and the stage, and ends the process with exit 7 (PeerLost's
  code). It works for every step kind and backend, including collectives replayed inside a
  CUDA graph, which neither NCCL's watchdog nor the process group's timeout sees;
- the process group's timeout (`dist.timeout_s`) on collectives launched eagerly: gloo raises
  in the waiting rank and `stage` turns that into one PeerLost naming the stage (exit 7); NCCL's
  own watchdog aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, set in `setup`).

Either way the rank exits, so torchrun's agent (`--max-restarts`) stops the others (SIGTERM,
then SIGKILL after 30 s: a SIGSTOPped worker only goes with the SIGKILL) and restarts the
group, which resumes from the newest checkpoint.
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


# what gloo (and torch's c10d) say when a peer is gone or silent; NCCL names itself
PEER_FAILURE_MARKERS = ("Timed out", "timed out", "timeout", "Connection closed", "Connection reset",
                        "pair closure", "Broken pipe", "NCCL", "gloo")

_timeout_s: int | None = None  # the process group's, for messages

# NCCL's watchdog on eagerly launched collectives: 1 = on a timeout or an error, abort the
# communicators and end the process (torchrun's agent then restarts the group). Decided here,
# in the worker, because it is the one place every launcher reaches (resnetdist's own, the
# launch/ scripts, Slurm, Docker, a bare torchrun) and because torchrun's agent overwrites any
# value its own environment has. It used to be 0 for graph runs (PyTorch's early CUDA-graph
# notes), which left a hung peer stalling the job forever; it is safe on with graphs now: work
# enqueued during capture is not handed to NCCL's watchdog (PyTorch >= 2.2), and the capture
# runs in thread_local error mode (training/graph.py), so the watchdog thread's event queries
# cannot invalidate it. Collectives replayed inside a graph are watched by HangWatch.
NCCL_ASYNC_ERROR_HANDLING = "1"


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


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_pref: str, timeout_s: int, hang_timeout_s: int = 0, on_hang: str = "exit") -> DistContext:
    """This rank's context; the process group when there are several ranks; the hang watchdog
    when hang_timeout_s > 0 (also for one process: a stuck device then ends it too). on_hang:
    what a detected hang does, "exit" (the process ends with exit 7, for torchrun to restart) or
    "raise" (PeerLost in the main thread: a notebook's kernel lives on)."""
    if on_hang not in ("exit", "raise"):
        raise ValueError(f"on_hang must be 'exit' or 'raise', got {on_hang!r}")
    global _timeout_s
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    device = resolve_device(device_pref, local_rank)
    if hang_timeout_s > 0:
        HangWatch.start(hang_timeout_s, rank, on_hang)
    if world_size > 1 and not dist.is_initialized():
        _timeout_s = timeout_s
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_ASYNC_ERROR_HANDLING  # read at the group's creation
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank, local_rank, world_size, device)


def cleanup() -> None:
    """The end of this rank's run: the hang watchdog stopped, the process group destroyed."""
    HangWatch.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def distributed() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def is_peer_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in PEER_FAILURE_MARKERS)


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Collectives of one stage of the run: the hang watchdog is armed for it (naming it), and a
    failure of theirs becomes a PeerLost naming it. Cheap (a try block and two list
    operations): it wraps whole chunks of steps, not each step."""
    watch = HangWatch.current
    if watch is not None:
        watch.enter(what)
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized() or isinstance(e, PeerLost) or not is_peer_failure(e):
            raise
        raise PeerLost(
            f"rank {dist.get_rank()}: the {what} failed: another rank stopped answering within "
            f"dist.timeout_s={_timeout_s} s or died (hung, stopped or killed); under torchrun with "
            f"--max-restarts the job restarts from the newest checkpoint. "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    finally:
        if watch is not None:
            watch.leave()


def progress(iteration: int | None = None) -> None:
    """The run moved on (the feed hands out the batch after `iteration` iterations done, an
    evaluation batch is done): the hang watchdog's clock starts again. A store and a clock
    read: cheap enough per step."""
    watch = HangWatch.current
    if watch is not None:
        watch.beat(iteration)


class HangWatch:
    """The hang watchdog: one daemon thread per process. Armed while the main thread is inside
    a stage (a wait on other ranks); when such a stage has seen no progress (`progress`, stage
    entries and exits) for `timeout_s`, it prints one line and ends the process with exit 7.

    What counts as progress, and why a healthy run cannot trip it: in training, every
    iteration (a step takes well under a second on a GPU, a few on a CPU, for the paper's
    nets); in evaluation, every batch (the final all-reduce waits at most one batch for the
    slowest rank); a checkpoint barrier waits for rank 0's write of a few MB; torch.compile's
    compilation (which can take minutes) pauses the clock. It is not counted before the first
    iteration completes: set-up (the model broadcast, CUDA-graph capture, the resume
    broadcast) runs eager collectives only, which the process group's timeout covers. A
    blocked main thread leaves this thread running: torch releases the GIL in collectives
    and device waits."""

    current: HangWatch | None = None
    compile_hooked = False

    def __init__(self, timeout_s: float, rank: int, on_hang: str = "exit"):
        self.timeout_s, self.rank, self.host, self.on_hang = timeout_s, rank, socket.gethostname(), on_hang
        self.main_thread = threading.main_thread().ident
        self.stages: list[str] = []
        self.last = time.monotonic()
        self.iteration: int | None = None  # iterations done when the feed last handed one out
        self.armed = False  # an iteration has completed (the feed handed out a second one)
        self.compiling = False
        self.stopped = False
        threading.Thread(target=self.watch, name="resnetdist-hang-watch", daemon=True).start()

    @classmethod
    def start(cls, timeout_s: float, rank: int, on_hang: str = "exit") -> HangWatch:
        """The process's watchdog (one per run: a second call in the same run keeps the first)."""
        if cls.current is None:
            cls.current = cls(timeout_s, rank, on_hang)
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

    def enter(self, what: str) -> None:
        self.stages.append(what)
        self.beat()

    def leave(self) -> None:
        self.stages.pop()
        self.beat()

    @classmethod
    def count_compiling_as_progress(cls) -> None:
        """torch.compile's compilation (minutes, for max-autotune) pauses the clock of the
        process's watchdog, whichever is current. Hooked once per process."""
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
            watch.compiling = now
            watch.beat()

    def stalled_for(self) -> float:
        """Seconds the current stage has gone without progress (0 when not watched)."""
        if not (self.stages and self.armed) or self.compiling:
            return 0.0
        return time.monotonic() - self.last

    def watch(self) -> None:
        while not self.stopped:
            time.sleep(min(1.0, self.timeout_s / 10))
            if not self.stopped and self.stalled_for() > self.timeout_s:
                self.fire()

    def fire(self) -> None:
        it = "before its first iteration" if self.iteration is None else f"after iteration {self.iteration}"
        if self.on_hang == "raise":
            self.raise_in_main(f"rank {self.rank} on {self.host}: no progress for {self.timeout_s:g} s "
                               f"(dist.hang_timeout_s) {it}, waiting in the {self.stages[-1] if self.stages else '?'}")
            return
        print(f"error: rank {self.rank} on {self.host}: no progress for {self.timeout_s:g} s "
              f"(dist.hang_timeout_s) {it}, waiting in the {self.stages[-1] if self.stages else '?'}: "
              f"another rank hung, was stopped or died, or this rank's device is stuck; exiting "
              f"{PeerLost.exit_code} so that torchrun (--max-restarts) restarts the job from the newest "
              f"checkpoint", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PeerLost.exit_code)  # the main thread is blocked: only the process can end it

    def raise_in_main(self, message: str) -> None:
        """PeerLost(message) raised in the main thread, asynchronously (it lands when that thread
        next runs Python code: at once if it polls, when a blocking call returns otherwise); the
        watchdog then stops, so it is raised once."""
        import ctypes

        error = type("HangDetected", (PeerLost,), {"__init__": lambda e: PeerLost.__init__(e, message)})
        self.stopped = True
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.main_thread), ctypes.py_object(error))


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
    """Rank 0's buffers (BatchNorm running statistics and counters) copied in place into every
    rank's model. Each rank's BN statistics drift apart between DDP's per-forward broadcasts;
    evaluating after this, every rank evaluates rank 0's model, the one model.pt saves. In
    place, so a captured graph still points at them (and DDP broadcasts from rank 0 at the next
    forward anyway, so training is unchanged)."""
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
