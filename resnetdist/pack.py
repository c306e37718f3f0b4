"""A pack: K runs of one net and recipe that differ only in seed, trained as one fused model
(models.CifarResNet with members = K; Wang et al., "Horizontally Fused Training Array", MLSys
2021), each member exactly as if it trained alone.

Why it is exact: the fused model's layers are per channel or per group (grouped convs with
groups = K, BN per channel, a batched matmul for the last layer, option A's zeros per member),
so member j's outputs depend only on member j's weights and images. The loss is the SUM of
the K members' mean losses, so member j's gradient is that of its own mean loss (a mean over
K would scale it by 1/K: a silently different learning rate). SGD with momentum and weight
decay is elementwise, so one optimizer step over the stacked parameters is K independent
steps. Nothing here couples members: no global-norm clipping, no shared statistics, and fp16's
loss scaler (which skips every member's step when one overflows) is refused for packs.

Every tensor of the fused state is the members' tensors stacked along dim 0 (models.py), so a
member's state is a slice of the fused one, in the single net's format and keys: split_state /
fuse_states (model weights and BN buffers) and split_optimizer_state / fuse_optimizer_states
(TensorLRSGD's momentum) convert both ways, bitwise. On the step's side (step.py), member j's
images, labels and augmentation numbers are row j of (K, B, ...) tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import ConfigError, ModelConfig, RunConfig
from .data.augment import augment
from .models import CifarResNet, build_model


def member_configs(cfg: RunConfig, seeds: Sequence[int]) -> list[RunConfig]:
    """`train --seeds 0,1,...`: `cfg` once per seed, each run in <parent>/<net>-s<seed>, the
    parent being train.out (--out) or runs/: the layout `reproduce` uses."""
    if cfg.log.name:
        raise ConfigError(f"log.name = {cfg.log.name!r} names one run; with --seeds each run is named <net>-s<seed>")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"a pack's runs need one train.seed each, got {list(seeds)}")
    if len(seeds) > 1 and cfg.train.precision == "fp16":
        raise ConfigError("train.precision = fp16 cannot train a pack: its loss scaler would skip every member's "
                          "step when one member overflows; use bf16 or fp32")
    parent = Path(cfg.train.out) if cfg.train.out else Path("runs")
    members = [copy.deepcopy(cfg) for _ in seeds]
    for member, seed in zip(members, seeds):
        member.train.seed = seed
        member.train.out = str(parent / member.name)
    return members


def build_pack(cfg: ModelConfig, seeds: Sequence[int], stem_channels: int = 3) -> CifarResNet:
    """The fused model of len(seeds) members, member j's initial weights exactly those of the
    single net built under seeds[j] (as trainer.make_model builds it: torch.manual_seed, then
    build_model). One seed gives the single net itself."""
    if len(seeds) == 0:
        raise ValueError("a pack needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)}: each seed once")
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(cfg))
    if len(models) == 1:
        return models[0]
    pack = CifarResNet(cfg, members=len(seeds), stem_channels=stem_channels)
    pack.load_state_dict(fuse_states([m.state_dict() for m in models]))
    return pack


def _fuse(tensors: list[torch.Tensor], key: str) -> torch.Tensor:
    if tensors[0].dim() == 0:  # BN's num_batches_tracked: one count, the same in every member
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ValueError(f"{key}: the members differ ({[t.item() for t in tensors]}); a pack steps them together")
        return tensors[0].clone()
    return torch.cat(tensors, 0)


def _split(t: torch.Tensor, members: int) -> list[torch.Tensor]:
    if t.dim() == 0:
        return [t.clone() for _ in range(members)]
    # clone: a slice saved by torch.save would carry the whole fused storage along
    return [c.clone() for c in t.chunk(members, 0)]


def fuse_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """K single-net model states (state_dict) -> the fused model's state."""
    keys = list(states[0])
    for j, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise ValueError(f"member {j}'s model state has other keys than member 0's: not the same net")
    return {k: _fuse([s[k] for s in states], k) for k in keys}


def split_state(state: dict[str, torch.Tensor], members: int) -> list[dict[str, torch.Tensor]]:
    """The fused model's state -> K single-net states, in today's format and keys."""
    parts = {k: _split(v, members) for k, v in state.items()}
    return [{k: parts[k][j] for k in state} for j in range(members)]


def fuse_optimizer_states(states: Sequence[dict]) -> dict:
    """K single-net optimizer states (TensorLRSGD.state_dict) -> the fused optimizer's state.
    Parameter indices and groups are the same in every member (the same net)."""
    fused = {idx: {key: _fuse([s["state"][idx][key] for s in states], f"optimizer state {idx}.{key}") for key in keys}
             for idx, keys in states[0]["state"].items()}
    return {"state": fused, "param_groups": [dict(g) for g in states[0]["param_groups"]]}


def split_optimizer_state(state: dict, members: int) -> list[dict]:
    """The fused optimizer's state -> K single-net optimizer states."""
    parts = {idx: {key: _split(v, members) for key, v in s.items()} for idx, s in state["state"].items()}
    return [{"state": {idx: {key: v[j] for key, v in s.items()} for idx, s in parts.items()},
             "param_groups": [dict(g) for g in state["param_groups"]]} for j in range(members)]


def pack_batch(images_u8: torch.Tensor, mean: torch.Tensor, aug: torch.Tensor, stem_channels: int) -> torch.Tensor:
    """A pack's input: member j's images images_u8[j] (uint8 (K, B, 3, 32, 32)) augmented with
    its own numbers aug[j] (K, 3, B), as its single run would augment them, laid out as
    (B, K*c, 32, 32), member j in channels [j*c, (j+1)*c), c = stem_channels (4: a zero channel
    after each member's 3; models.CifarResNet says why)."""
    k, b = images_u8.shape[:2]
    flat = augment(images_u8.flatten(0, 1), mean, aug.transpose(0, 1).flatten(1))  # per image: as K runs
    x = flat.unflatten(0, (k, b)).transpose(0, 1)  # (B, K, 3, 32, 32)
    if stem_channels == 4:
        x = F.pad(x, (0, 0, 0, 0, 0, 1))
    return x.flatten(1, 2)


def member_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backpropagate, each member's mean loss (K,)). One run: labels (B,), the
    mean cross-entropy. A pack: fused logits (B, K*classes), labels (K, B), and the loss is the
    SUM of the members' mean losses, never their mean (the module says why)."""
    if labels.dim() == 1:
        loss = F.cross_entropy(logits, labels)
        return loss, loss.view(1)
    k, b = labels.shape
    per_image = F.cross_entropy(logits.view(b, k, -1).transpose(0, 1).flatten(0, 1), labels.flatten(),
                                reduction="none")
    losses = per_image.view(k, b).mean(1)
    return losses.sum(), losses


def member_sums(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Each member's (loss sum, wrong, count) (K, 3), float32, from one step's logits, labels
    and member_losses' mean losses (K,); K = 1 for one run."""
    if labels.dim() == 1:
        loss, n = losses[0].detach().float(), labels.numel()
        wrong = (logits.argmax(1) != labels).sum()
        return torch.stack([loss * n, wrong.float(), torch.full_like(loss, n)]).view(1, 3)
    k, b = labels.shape
    wrong = (logits.view(b, k, -1).argmax(2).transpose(0, 1) != labels).sum(1).float()
    return torch.stack([losses.detach().float() * b, wrong, torch.full_like(wrong, b)], 1)
