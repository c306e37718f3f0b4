"""Layer responses (He et al. 2015, Figure 7), computed from a finished run's model.pt as
FIGURE7_DEFINITION says, in true fp32, and cached in the run's folder (RunDir.responses_cache)
with model.pt's sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..rundir import RunDir, read_json
from .discover import ReportError, RunRecords

FIGURE7_DEFINITION = (
    "std of each 3x3 layer's response (its output after BN, before the ReLU or the addition) over the whole "
    "test set in evaluation mode, over all values (images x channels x positions); layers in forward order "
    "(the first conv, then each block's two convs); option B's 1x1 projection convs are left out")
BATCH = 500  # test images per forward pass
BAR_DELAY_S = 3.0  # the progress bar appears only when the work takes longer than this


@dataclass
class Responses:
    """One run's layer responses (stds in forward order) and whether they came from the cache."""
    run: RunRecords
    stds: list[float]
    cached: bool
    model_sha256: str


def response_maps(model: torch.nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """models.CifarResNet's forward pass up to the last block, yielding each 3x3 conv's BN
    output (the response) where it is made: the stem, then conv1 and conv2 of every block."""
    out = model.bn(model.conv(x))
    yield out
    x = F.relu(out)
    for block in model.blocks:
        out = block.bn1(block.conv1(x))
        yield out
        out = block.bn2(block.conv2(F.relu(out)))
        yield out
        if block.residual:
            out = out + block.shortcut(x)
        x = F.relu(out)


@torch.no_grad()
def layer_stds(model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor, label: str = "") -> list[float]:
    """The std of every 3x3 layer's response over `images` (uint8, N x 3 x 32 x 32, on the
    model's device), evaluation mode, fp32; sums in float64 so 10,000 images lose nothing."""
    from ..data.augment import normalize
    from ..progress import progress_bar
    from ..training import true_fp32

    model.eval()
    totals = None  # per layer: sum, sum of squares, count
    batches = range(0, len(images), BATCH)
    with true_fp32(), progress_bar(f"layer responses {label}", total=len(batches), unit="batch",
                                   delay=BAR_DELAY_S) as bar:
        for start in batches:
            x = normalize(images[start : start + BATCH], mean)
            stats = torch.tensor([(r.sum().item(), (r * r).sum().item(), r.numel())
                                  for r in (m.double() for m in response_maps(model, x))], dtype=torch.float64)
            totals = stats if totals is None else totals + stats
            bar.update(1)
    s, q, n = totals.T
    return (q / n - (s / n) ** 2).clamp(min=0).sqrt().tolist()


def _cached(run: RunRecords, sha: str) -> list[float] | None:
    data = read_json(RunDir(run.path).responses_cache) or {}
    if data.get("model_sha256") == sha and isinstance(data.get("stds"), list):
        return [float(v) for v in data["stds"]]
    return None


class CifarTestSets:
    """The test sets the runs name (data.dir in their config), each read once per report."""

    def __init__(self, device: torch.device):
        self.device = device
        self.by_dir: dict[str, torch.Tensor] = {}

    def get(self, data_dir: str | None) -> torch.Tensor:
        from ..data.cifar import load_cifar10

        key = data_dir or ""
        if key not in self.by_dir:
            data = load_cifar10(Path(data_dir) if data_dir else None, False)
            self.by_dir[key] = torch.from_numpy(data.test.images).to(self.device)
        return self.by_dir[key]


def run_responses(run: RunRecords, images: CifarTestSets) -> Responses:
    """One run's layer responses, from the cache when model.pt is unchanged. A model.pt that
    is not a resnetdist model is a ReportError naming it."""
    from ..errors import CheckpointError
    from ..pretrained import saved_net

    path = RunDir(run.path).model
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if (stds := _cached(run, sha)) is not None:
        return Responses(run, stds, True, sha)
    try:
        model, cfg, state = saved_net(path)
    except CheckpointError as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise ReportError(f"{path}: not a resnetdist model, so no Figure 7 and nothing written ({detail})") from None
    if "mean" not in state:
        raise ReportError(f"{path}: holds no mean image (a checkpoint older than the report's Figure 7)")
    test = images.get(cfg.data.dir)
    model = model.to(images.device)
    stds = layer_stds(model, test, state["mean"].to(images.device), run.name)
    return Responses(run, stds, False, sha)


def all_responses(runs: list[RunRecords]) -> tuple[list[Responses], list[str]]:
    """Layer responses of every finished run with a model.pt, and one note per run left out.
    Nothing is written here: the caller writes the caches once every run has succeeded."""
    from ..dist import device_for
    from ..errors import DataError

    images = CifarTestSets(device_for("auto", 0))
    found, notes = [], []
    for run in runs:
        if not RunDir(run.path).model.exists():
            notes.append(f"{run.path}: no model.pt (unfinished), left out of Figure 7")
            continue
        try:
            found.append(run_responses(run, images))
        except DataError as e:
            notes.append(f"{run.path}: its test set cannot be read ({e}), left out of Figure 7")
    return found, notes


def write_caches(responses: list[Responses]) -> None:
    """Each run's values beside its model.pt; a run folder that cannot be written (read-only,
    another user's) simply keeps no cache."""
    from ..checkpoint import atomic_write_json
    from ..errors import WriteError

    for r in responses:
        if not r.cached:
            try:
                atomic_write_json(RunDir(r.run.path).responses_cache, {"model_sha256": r.model_sha256, "stds": r.stds})
            except (OSError, WriteError):
                pass
