"""ResNet-(6n+2) and Plain-(6n+2) for CIFAR-10, as in He et al. 2015, section 4.2.

A 3x3 conv with 16 filters, then three stages of n basic blocks on 32x32 (16 filters),
16x16 (32) and 8x8 (64) maps, global average pooling and a 10-way linear layer. The first
conv of stages 2 and 3 has stride 2. Every conv is followed by BatchNorm; there is no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample spatially by 2 and append zero channels; no parameters."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def projection_shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Option B: 1x1 conv + BN where the shape changes."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, residual: bool, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_ch != out_ch):
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(out_ch - in_ch)
            else:
                self.shortcut = projection_shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(STAGE_WIDTHS[0])
        blocks = []
        in_ch = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            for i in range(cfg.n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, not cfg.plain, cfg.shortcut))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers"): fan_out, as in the authors' code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def build_model(cfg: ModelConfig) -> CifarResNet:
    cfg.validate()
    return CifarResNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- factories and the registry (torchvision style) -------------------------------------------
# resnetdist.resnet20() ... plain56(), and resnetdist.create_model("resnet56", shortcut="B"):
# the net the trainer builds (build_model, the same class and state-dict keys), with its initial
# weights. One table: a name is a depth and whether the net has shortcuts.

MODELS: dict[str, tuple[int, bool]] = {
    **{f"resnet{6 * n + 2}": (n, False) for n in (3, 5, 7, 9, 18, 200)},  # 20, 32, 44, 56, 110, 1202
    **{f"plain{6 * n + 2}": (n, True) for n in (3, 5, 7, 9)},  # 20, 32, 44, 56 (the paper's plain nets)
}


def list_models() -> list[str]:
    """The names create_model accepts, in the paper's order."""
    return list(MODELS)


def create_model(name: str, *, shortcut: str = "A", num_classes: int = 10) -> CifarResNet:
    """The named net (list_models()) with fresh He-initialised weights, in training mode.
    shortcut: "A" (identity, zero-padded channels where the width doubles; the paper's CIFAR-10
    choice) or "B" (1x1 projection there); num_classes: outputs of the last layer."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; one of: {', '.join(MODELS)}")
    n, plain = MODELS[name]
    try:
        return build_model(ModelConfig(n=n, plain=plain, shortcut=shortcut, num_classes=num_classes))
    except ValueError as e:
        raise ValueError(f"create_model({name!r}): {e}") from None


def _factory(name: str):
    def make(*, shortcut: str = "A", num_classes: int = 10) -> CifarResNet:
        return create_model(name, shortcut=shortcut, num_classes=num_classes)

    depth = name.removeprefix("resnet").removeprefix("plain")
    kind = "plain net (no shortcuts)" if MODELS[name][1] else "ResNet"
    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"The {depth}-layer CIFAR-10 {kind} of He et al. 2015, section 4.2 (create_model({name!r}, ...))."
    return make


resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = (
    _factory(f"resnet{d}") for d in (20, 32, 44, 56, 110, 1202))
plain20, plain32, plain44, plain56 = (_factory(f"plain{d}") for d in (20, 32, 44, 56))
