"""A stand-in for torch.cuda's streams and graphs (graph.CudaOps on a CPU), so the graph capture
and replay logic runs in the CPU tests (tests/test_gpu_path.py, tests/test_epochs.py)."""

from __future__ import annotations

from contextlib import contextmanager


class FakeStream:
    def __init__(self, name: str):
        self.name = name

    def wait_stream(self, other) -> None:
        pass


class FakeGraph:
    body = None

    def replay(self) -> None:
        self.body()  # what a replay does: the captured body, again


class FakeOps:
    """graph.CudaOps on a CPU: records which stream is current when things happen."""

    def __init__(self, fail: bool = False):
        self.current, self.captures, self.fail, self.made, self.joins = "default", [], fail, [], []

    def side_stream(self):
        self.made.append(FakeStream(f"side{len(self.made)}"))
        return self.made[-1]

    def wait_for_current(self, stream) -> None:
        pass

    @contextmanager
    def use(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def join(self, stream) -> None:
        self.joins.append((stream, len(self.captures)))  # which stream, and how many captures came before

    def new_graph(self):
        return FakeGraph()

    def record(self, graph, stream, body) -> None:
        self.captures.append((stream, self.current))
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        graph.body = body
        body()
