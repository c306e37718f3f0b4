"""SGD with momentum and weight decay whose learning rate is a device tensor.

torch.optim.SGD turns a tensor lr into a Python number (a host sync), which a CUDA graph
cannot capture. This optimizer keeps lr on the device and its momentum buffers allocated
from the start, so one captured step can be replayed while the schedule changes the lr.
The update is PyTorch's SGD (dampening 0, no Nesterov):
    d = grad + wd * p;  buf = momentum * buf + d;  p -= lr * buf
A zero-initialised buffer gives buf = d on the first step, as torch.optim.SGD does.
"""

from __future__ import annotations

import torch


class TensorLRSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: torch.Tensor, momentum: float, weight_decay: float):
        super().__init__(params, dict(momentum=momentum, weight_decay=weight_decay))
        self.lr = lr
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict) -> None:
        """torch's Optimizer.load_state_dict puts new tensors in the state; a CUDA graph captured
        on this optimizer would go on reading the old ones. Here the loaded values are copied
        into the existing momentum buffers, so a graph stays valid (and a missing buffer in an
        old checkpoint keeps its zeros)."""
        buffers = {p: self.state[p]["momentum_buffer"] for group in self.param_groups for p in group["params"]}
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, buf in buffers.items():
                loaded = self.state[p].get("momentum_buffer")
                if loaded is not None and loaded is not buf:
                    buf.copy_(loaded)
                self.state[p]["momentum_buffer"] = buf

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_sub_(params, torch._foreach_mul(bufs, self.lr))
