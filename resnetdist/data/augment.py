"""The paper's augmentation as a few batched tensor ops on the training device.

Pixels are scaled to [0, 1] and the mean image (per pixel, from the training set) is
subtracted; the result is zero-padded by 4 on each side, and one gather takes a random 32x32
window of it, mirrored left-right for a random half of the batch. Padding after the mean
subtraction makes the border the mean colour rather than black.

The random numbers for iteration i come from (seed, i) alone, drawn for the whole global
batch and sliced per rank: the same image gets the same crop whatever the world size, and
resuming at iteration i needs no RNG state. They are a counter-based hash of (seed, iteration,
row, position) (SplitMix64's finaliser, in wrapping uint64 arithmetic), so a whole epoch's
draws are a few array operations (`draw_block`), with no generator or Python loop per
iteration: the epoch-ahead thread (data/epochs.py) then holds the GIL for milliseconds, not
for the ~30-100 ms that 390 generators took.
"""

from __future__ import annotations

import numpy as np
import torch

from .order import rank_slice

PAD = 4
SIZE = 32


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose output bits all depend on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
AUG_STREAM = 0xA06  # this stream's key beside the seed (the sample order has its own)


def draw_block(seed: int, first_iter: int, count: int, global_batch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's augmentation for iterations first_iter .. first_iter+count-1: int64
    (count, 3, b), rows = crop row offset, crop column offset (both in [0, 2*PAD]) and flip
    (0/1). One hash per number, computed for the whole block at once."""
    cols = rank_slice(global_batch, rank, world_size)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, by design
        key = _mix(np.uint64(seed) * GOLDEN + np.uint64(AUG_STREAM))
        its = _mix(key + (np.arange(first_iter, first_iter + count, dtype=np.uint64) + np.uint64(1)) * GOLDEN)
        cols = np.arange(cols.start, cols.stop, dtype=np.uint64)
        cell = (np.arange(3, dtype=np.uint64)[:, None] << np.uint64(32)) | cols  # (3, b): row and position
        h = _mix(its[:, None, None] ^ _mix(cell + GOLDEN)[None])  # (count, 3, b)
    out = (h % np.uint64(2 * PAD + 1)).astype(np.int64)
    out[:, 2] = (h[:, 2] >> np.uint64(63)).astype(np.int64)  # flip: the top bit, a fair coin
    return out


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
    """Training view: normalize, pad, random crop, random flip; params: one iteration's (3, b)
    of draw_block, on the images' device."""
    return crop_flip(normalize(images_u8, mean), params[0], params[1], params[2].bool())


def training_mean(mode: str, channel_mean: list[float], train_images_u8: np.ndarray | None) -> torch.Tensor:
    """The mean image a run subtracts (data.mean), float32 (3,32,32) in [0,1] units: per pixel
    over the uint8 (N,3,32,32) training images, or constant per channel from `channel_mean` in
    0-255 units (the seed repo's preset, which needs no images)."""
    if mode == "channel":
        m = torch.tensor(channel_mean, dtype=torch.float32) / 255.0
        return m[:, None, None].expand(3, SIZE, SIZE).contiguous()
    return torch.from_numpy(train_images_u8.mean(axis=0, dtype=np.float64).astype(np.float32) / 255.0)
