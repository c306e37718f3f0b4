"""A trained net as one module: `Classifier` holds the net and the mean image it was trained
with (a buffer), so it takes images as they come (uint8 (N,3,32,32), or floats in [0,1]) and
returns logits. Every run writes one as `model.safetensors` beside `model.pt` (Trainer.finish);
`resnetdist.load` reads either file (or a run folder) back into one, in eval mode.

model.safetensors is `Classifier.state_dict()` exactly (`mean`, then `net.*` as the trainer's
CifarResNet names them) with string metadata: `format` (resnetdist), `model`, `depth`, `plain`,
`shortcut`, `num_classes`, `iteration`, `config` (the run's resolved configuration as JSON,
which rebuilds the net) and `preprocess`. `resnetdist export --format safetensors` writes the
same (and the mean image beside it as .npy).
It is read without pickle: `safetensors.torch.load_file` gives the tensors, and
`safetensors.safe_open(path, "pt").metadata()` the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import ConfigError, RunConfig, from_dict
from .errors import CheckpointError
from .models import build_model
from .rundir import RunDir

PREPROCESS = "uint8 (N,3,32,32) RGB -> x / 255 - mean; floats are taken as already in [0, 1]"


class Classifier(nn.Module):
    """`net` preceded by the run's preprocessing: images in [0, 1] (uint8 images are divided by
    255 first, as training does) minus the training mean image (`mean`, float32 (3,32,32))."""

    def __init__(self, net: nn.Module, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the same operations as training's normalize (data/augment.py), so the logits are its
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        return self.net(x.sub(self.mean))


def metadata(cfg: RunConfig, iteration: int) -> dict[str, str]:
    """model.safetensors's strings (`export` adds its own)."""
    m = cfg.model
    return {"format": "resnetdist", "model": m.name, "depth": str(m.depth), "plain": str(m.plain).lower(),
            "shortcut": m.shortcut, "num_classes": str(m.num_classes), "iteration": str(iteration),
            "config": json.dumps(cfg.to_dict(), sort_keys=True), "preprocess": PREPROCESS}


def to_bytes(net: nn.Module, mean: torch.Tensor, meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in Classifier(net, mean).state_dict().items()}
    return save(tensors, metadata=meta)


def save(path: Path, net: nn.Module, mean: torch.Tensor, cfg: RunConfig) -> None:
    """A run's model.safetensors, written as model.pt is: atomic, with its sha256 sidecar."""
    checkpoint.atomic_save_bytes(to_bytes(net, mean, metadata(cfg, cfg.optim.iters)), path)


def load(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The trained net of a run, in eval mode, on `device`: from its model.safetensors (read
    without pickle), its model.pt or a ckpt_*.pt, or the run folder (its model.safetensors, else
    model.pt). Every way the file can be wrong is one CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        found = next((p for p in (run.safetensors, run.model) if p.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: a folder without {run.safetensors.name} or {run.model.name} (not a finished run)")
        path = found
    classifier = _from_safetensors(path) if path.suffix == ".safetensors" else _from_torch_file(path)
    return classifier.to(device).eval()


def mean_of(state: dict[str, Any], cfg: RunConfig, path: Path, data_dir: Path | None) -> torch.Tensor:
    """The mean image the run trained with: stored in the checkpoint by newer runs; else the
    channel preset, else recomputed from the training data (which must then be reachable)."""
    from .data.augment import training_mean

    if "mean" in state:
        return state["mean"].float().cpu()
    if cfg.data.mean == "channel":
        return training_mean(cfg.data.mean, cfg.data.channel_mean, None)
    from .data.cifar import DataError, load_cifar10

    folder = data_dir or (Path(cfg.data.dir) if cfg.data.dir else None)
    try:
        data = load_cifar10(folder, cfg.data.val_split)
    except DataError as e:
        raise CheckpointError(
            f"{path} holds no mean image (an older checkpoint) and the training data to recompute it "
            f"is not available ({e}); give its folder (export: --data-dir)"
        ) from None
    return training_mean(cfg.data.mean, cfg.data.channel_mean, data.train.images)


def _config(tree: Any, path: Path) -> RunConfig:
    try:
        return from_dict(tree, f"{path} (config)")
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its config is not a resnetdist configuration ({e})") from None


def saved_net(path: Path) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """The net a model.pt or ckpt_*.pt holds (on the CPU, built from the file's own config),
    the config and the file's dict: `load`, `eval`, `export` and the report's Figure 7 all read
    saved weights here. Missing, truncated, foreign, a config or weights that do not fit: one
    CheckpointError naming the file."""
    state = checkpoint.load_model_file(path)
    cfg = _config(state["config"], path)
    net = build_model(cfg.model)
    checkpoint.load_weights(net, state, path)
    return net, cfg, state


def _from_torch_file(path: Path) -> Classifier:
    net, cfg, state = saved_net(path)
    return Classifier(net, mean_of(state, cfg, path, None))  # the mean: in every model.pt since it moved there


def _from_safetensors(path: Path) -> Classifier:
    from safetensors.torch import load as tensors_of

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    data = checkpoint.read_verified(path)  # against its sha256 sidecar, as model.pt (CorruptCheckpoint)
    try:
        tensors = tensors_of(data)
        # the header: 8 bytes (its length, little-endian), then JSON whose __metadata__ holds the strings
        meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001 - SafetensorError, a bad header: the file is named instead
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]})") from None
    if meta.get("format") != "resnetdist" or "config" not in meta or "mean" not in tensors:
        raise CheckpointError(f"{path}: a safetensors file, but not a resnetdist model (no resnetdist config "
                              f"and mean image in it)")
    try:
        tree = json.loads(meta["config"])
    except ValueError:
        raise CheckpointError(f"{path}: its config metadata is not JSON") from None
    cfg = _config(tree, path)
    classifier = Classifier(build_model(cfg.model), tensors["mean"])
    checkpoint.load_weights(classifier, {"model": tensors}, path)
    return classifier
