"""CUDA-graph capture of the training step: the torch.cuda calls it makes (CudaOps, in one
place: `cuda_ops`, the module's instance, is what every capture uses), the graph's static input
buffers, warm-up -> capture -> restore, and the ranks agreeing on the outcome, so that no rank
waits in a collective the others skip.

One side stream serves DDP construction, warm-up and capture: DDP's reducer keeps the
gradient-accumulator nodes made on the stream it was built on, and a capture on any other
stream fails (PyTorch's CUDA-graph notes; Megatron-LM met it on H100s). So the step's builder
wraps the model inside `GraphCapture.on_side()`, then calls `capture_agreed`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import dist

GRAPH_WARMUP = 11  # DDP needs 11 warm-up iterations before capture (PyTorch's CUDA graph notes)

Replay = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (images_u8, labels, aug)


class CaptureFailed(RuntimeError):
    """CUDA-graph capture failed on this rank or another; the message says why."""


class CudaOps:
    """The torch.cuda calls that graph capture makes (a CPU test puts a stand-in in `cuda_ops`)."""

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
        # stream=: capture on our side stream, not on a fresh one of torch.cuda.graph's own.
        # thread_local: only this thread's unsafe CUDA calls break the capture, not those of
        # other threads (NCCL's watchdog querying events, the hang watchdog, a loader thread),
        # which in the default "global" mode fail it ("operation not permitted when stream is
        # capturing"; Megatron-LM captures this way for the same reason)
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            body()


cuda_ops = CudaOps()  # the calls every GraphCapture makes


class StaticInputs:
    """The graphed step's input buffers: the feed's (data/feed.py, refilled in place). A replay
    handed those very tensors copies nothing; handed others, it copies them in. A pack's have one
    row per member: (K, b, 3, 32, 32), (K, b), (K, 3, b)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, aug: torch.Tensor):
        self.x, self.y, self.aug = x, y, aug

    def fill(self, images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
        for buffer, given in ((self.x, images_u8), (self.y, labels), (self.aug, aug)):
            if given is not buffer:
                buffer.copy_(given, non_blocking=True)


class GraphCapture:
    """One step's capture: the side stream (made at once, for DDP's construction), then `capture_agreed`."""

    def __init__(self):
        self.ops = cuda_ops
        self.side = self.ops.side_stream()

    def on_side(self):
        return self.ops.use(self.side)

    def capture_agreed(self, step, inputs: StaticInputs) -> Replay:  # step: step.TrainStep
        """The replay when every rank captured; else CaptureFailed saying why (this rank's error, or
        that another rank failed), the step's state as before the warm-up, so that the caller may
        run the eager step instead (train.step = auto) or stop (graph)."""
        try:
            run, error = self.capture(step, inputs), None
        except Exception as e:  # noqa: BLE001 - any capture failure is reported, with its reason
            run = None
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        failed = dist.all_reduce_sum(torch.tensor([float(error is not None)], device=step.device))
        if error is None and failed.item() == 0:
            return run
        step.optimizer.zero_grad(set_to_none=True)  # the warm-up's last gradients
        raise CaptureFailed(error or "capture failed on another rank")

    def capture(self, step, inputs: StaticInputs) -> Replay:
        """Record the whole step as one CUDA graph. Warm-up steps (needed before capture, and
        by DDP) change weights, optimizer state and BN statistics, so those are restored in
        place afterwards, whether capture worked or not: the graph keeps pointing at the same
        tensors, and an eager fall-back starts from the same state."""
        # DDP's construction broadcast rank 0's weights on the side stream: the default stream
        # waits for it before cloning them, or the clone could read a rank's own initial
        # weights (equal today only because every rank starts from the same seed)
        self.ops.join(self.side)
        keep = step.device_state()
        saved = [t.detach().clone() for t in keep]
        graph = self.ops.new_graph()
        self.ops.wait_for_current(self.side)  # the clones above (and the inputs' last writes) come first
        try:
            with self.on_side():
                for _ in range(GRAPH_WARMUP):
                    step.graph_body(inputs)
                self.ops.record(graph, self.side, lambda: step.graph_body(inputs))
        finally:
            self.ops.join(self.side)
            with torch.no_grad():
                for t, s in zip(keep, saved):
                    t.copy_(s)

        def replay(images_u8: torch.Tensor, labels: torch.Tensor, aug: torch.Tensor) -> None:
            inputs.fill(images_u8, labels, aug)
            graph.replay()

        return replay
