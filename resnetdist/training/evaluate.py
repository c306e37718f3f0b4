"""Error rates of a model on the evaluation sets, and `resnetdist eval CHECKPOINT`: the test
error of saved weights, computed as training does."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .. import dist
from ..config import RunConfig
from ..data import load_data, open_eval_loaders
from ..data.cifar import load_test_only
from ..data.augment import normalize, training_mean
from ..pretrained import saved_net


@contextmanager
def true_fp32():
    """True fp32 kernels, chosen the same way in every process, for the duration: TF32 off for
    matmul and cuDNN convolutions (cuDNN's is on by default), cuDNN kernels picked by its
    heuristics rather than timed (cudnn.benchmark may pick differently in another process) and
    deterministic. Restored after, so training keeps its own settings."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = saved[1:]


def model_layout(cfg: RunConfig, device: torch.device) -> torch.memory_format:
    """The one layout a run's model trains and is evaluated in (training and `resnetdist eval`
    alike, so both run the same kernels): channels_last on CUDA when train.channels_last, else NCHW."""
    return torch.channels_last if cfg.train.channels_last and device.type == "cuda" else torch.contiguous_format


@torch.no_grad()
def error_rates(model: nn.Module, loaders: dict[str, Iterable], mean: torch.Tensor,
                memory_format=torch.contiguous_format) -> dict[str, float]:
    """Error (%) on each evaluation set, single view (mean subtraction only), the same way
    wherever it runs: true fp32 whatever the training precision, inputs in the model's layout, so
    `resnetdist eval model.pt` equals summary.json's test error. Every rank counts its shard of
    rank 0's model (BN statistics broadcast first); the counts are all-reduced, so the figure is
    exact under DDP."""
    dist.broadcast_buffers(model)
    model.eval()
    out = {}
    with true_fp32():
        for name, loader in loaders.items():
            counts = torch.zeros(2, dtype=torch.float64, device=mean.device)
            for images, labels in loader:
                x = normalize(images, mean).contiguous(memory_format=memory_format)
                with torch.autocast(mean.device.type, enabled=False):
                    logits = model(x)
                counts[0] += (logits.argmax(1) != labels).sum()
                counts[1] += labels.numel()
                dist.progress()  # the hang watchdog's clock: a batch done
            dist.all_reduce_sum(counts)
            out[f"{name}_error"] = 100.0 * counts[0].item() / counts[1].item()
    model.train()
    return out


def evaluate_checkpoint(path: Path, data_dir: Path | None, device: str = "auto") -> dict[str, Any]:
    """A checkpoint's (ckpt_*.pt or model.pt) error on the test set (and the validation set, if
    the run held one out)."""
    model, cfg, state = saved_net(path)  # CheckpointError names a missing or foreign file
    if data_dir is not None:
        cfg.data.dir = str(data_dir)
    cfg.data.loader = "resident"  # one process reads the whole set: no .beton files needed
    dev = dist.device_for(device, 0)
    layout = model_layout(cfg, dev)  # the layout it trained (and was evaluated) in
    model = model.to(dev, memory_format=layout)
    # the test set alone when the checkpoint holds its mean and no validation split is asked for
    data = load_test_only(cfg.data.dir) if "mean" in state and not cfg.data.val_split else load_data(cfg.data)
    # the exact mean image the run trained with; older checkpoints lack it
    mean = state["mean"] if "mean" in state else training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)
    loaders = open_eval_loaders(cfg.data, data, dist.DistContext(0, 0, 1, dev))
    errors = error_rates(model, loaders, mean.to(dev), layout)
    images = {f"{name}_images": len(split) for name, split in (("test", data.test), ("val", data.val)) if split is not None}
    return {"checkpoint": str(path), "model": cfg.model.name, "depth": cfg.model.depth, "plain": cfg.model.plain,
            "iteration": state.get("iteration"), **errors, **images}


def describe(result: dict[str, Any]) -> str:
    """`eval`'s line for people: test error 8.75% on 10,000 images (model.pt, ResNet-20, iteration 64,000)."""
    net = f"{'Plain' if result['plain'] else 'ResNet'}-{result['depth']}"
    where = [Path(result["checkpoint"]).name, net]
    if result.get("iteration") is not None:
        where.append(f"iteration {result['iteration']:,}")
    line = f"test error {result['test_error']:.2f}% on {result['test_images']:,} images ({', '.join(where)})"
    if result.get("val_error") is not None:
        line += f"; validation error {result['val_error']:.2f}% on {result['val_images']:,} images"
    return line
