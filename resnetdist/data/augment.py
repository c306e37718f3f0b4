"""The paper's augmentation as a few batched tensor ops on the training device.

Pixels are scaled to [0, 1] and the mean image (per pixel, from the training set) is
subtracted; the result is zero-padded by 4 on each side, and one gather takes a random 32x32
window of it, mirrored left-right for a random half of the batch. Padding after the mean
subtraction makes the border the mean colour rather than black.

The random numbers for iteration i come from (seed, i) alone, drawn for the whole global
batch and sliced per rank: the same image gets the same crop whatever the world size, and
resuming at iteration i needs no RNG state.
"""

from __future__ import annotations

import numpy as np
import torch

PAD = 4
SIZE = 32


def draw_params(seed: int, iteration: int, global_batch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's augmentation for one iteration: int64 (3, b), rows = crop row offset,
    crop column offset (both in [0, 2*PAD]) and flip (0/1). One tensor, so one host-to-device copy."""
    rng = np.random.default_rng([seed, 0xA06, iteration])
    params = np.empty((3, global_batch), dtype=np.int64)
    params[:2] = rng.integers(0, 2 * PAD + 1, size=(2, global_batch))
    params[2] = rng.random(global_batch) < 0.5
    b = global_batch // world_size
    return torch.from_numpy(np.ascontiguousarray(params[:, rank * b : (rank + 1) * b]))


def normalize(images_u8: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,32,32) -> float32 in [0,1] minus the mean image (3,32,32, same units)."""
    return images_u8.float().div_(255.0).sub_(mean)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad by PAD, then take the window at (dy, dx), mirrored where flip is set."""
    b, c = x.shape[:2]
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    ar = torch.arange(SIZE, device=x.device)
    rows = dy[:, None] + ar  # (B, 32)
    # a mirrored window reads its columns right to left
    cols = torch.where(flip[:, None], dx[:, None] + (SIZE - 1) - ar, dx[:, None] + ar)
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]  # (B,32,32,C)
    return out.permute(0, 3, 1, 2)


def augment(images_u8: torch.Tensor, mean: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Training view: normalize, pad, random crop, random flip; params from draw_params, on the
    images' device."""
    return crop_flip(normalize(images_u8, mean), params[0], params[1], params[2].bool())


def mean_image(images_u8: np.ndarray) -> torch.Tensor:
    """Per-pixel mean of a uint8 (N,3,32,32) training set, in [0,1] units, float32 (3,32,32)."""
    return torch.from_numpy(images_u8.mean(axis=0, dtype=np.float64).astype(np.float32) / 255.0)


def training_mean(mode: str, channel_mean: list[float], train_images_u8: np.ndarray | None) -> torch.Tensor:
    """The mean image a run subtracts (data.mean): per pixel over the training images, or the
    constant channel preset (which needs no images)."""
    if mode == "channel":
        return channel_mean_image(channel_mean)
    return mean_image(train_images_u8)


def channel_mean_image(channel_mean: list[float]) -> torch.Tensor:
    """A constant mean image from per-channel means given in 0-255 units (the seed repo's preset)."""
    m = torch.tensor(channel_mean, dtype=torch.float32) / 255.0
    return m[:, None, None].expand(3, SIZE, SIZE).contiguous()
