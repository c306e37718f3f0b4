"""ResNet-(6n+2) and Plain-(6n+2) for CIFAR-10, as in He et al. 2015, section 4.2.

A 3x3 conv with 16 filters, then three stages of n basic blocks on 32x32 (16 filters),
16x16 (32) and 8x8 (64) maps, global average pooling and a 10-way linear layer. The first
conv of stages 2 and 3 has stride 2. Every conv is followed by BatchNorm; there is no dropout.

`members` = K > 1 is K copies of that net side by side in one module (a pack, pack.py):
grouped convs (groups = K), one BN over K*C channels (K independent BNs, BN being per
channel), option A's zeros per member, the final linear a batched matmul (MemberLinear); member
j's images in input channels [j*c, (j+1)*c), its tensors stacked along dim 0 of every state
tensor. K = 1 is the single net, with today's module classes, keys and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample spatially by 2 and append zero channels; no parameters. In a pack,
    each member's channels get their own zeros."""

    def __init__(self, extra_channels: int, members: int = 1):
        super().__init__()
        self.extra_channels = extra_channels
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = x[:, :, ::2, ::2]
        if self.members == 1:
            return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        # (B, K*C, H, W) -> (B, K, C, H, W): pad each member's C, then stack them again; kept
        # in the input's layout, so the residual sum does not mix NCHW and channels_last
        x = F.pad(x.unflatten(1, (self.members, -1)), (0, 0, 0, 0, 0, self.extra_channels))
        return x.flatten(1, 2).contiguous(memory_format=layout)


class MemberLinear(nn.Module):
    """K nn.Linear (in -> out) as one batched matmul, member j reading features [j*in, (j+1)*in)
    and writing outputs [j*out, (j+1)*out); weight (K*out, in) and bias (K*out)."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members * out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b = self.members, x.shape[0]
        x = x.view(b, k, self.in_features).transpose(0, 1)  # (K, B, in)
        w = self.weight.view(k, self.out_features, self.in_features)
        y = torch.baddbmm(self.bias.view(k, 1, self.out_features), x, w.transpose(1, 2))  # (K, B, out)
        return y.transpose(0, 1).reshape(b, k * self.out_features)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, residual: bool, shortcut: str, members: int = 1):
        super().__init__()
        k = members
        self.conv1 = nn.Conv2d(k * in_ch, k * out_ch, 3, stride=stride, padding=1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * out_ch)
        self.conv2 = nn.Conv2d(k * out_ch, k * out_ch, 3, padding=1, bias=False, groups=k)
        self.bn2 = nn.BatchNorm2d(k * out_ch)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_ch != out_ch):
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(out_ch - in_ch, k)
            else:  # option B: 1x1 conv + BN where the shape changes
                self.shortcut = nn.Sequential(nn.Conv2d(k * in_ch, k * out_ch, 1, stride=stride, bias=False, groups=k),
                                              nn.BatchNorm2d(k * out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """The net; `members` > 1 a pack of K (pack.build_pack gives each member the initial
    weights of the single net of its seed). `stem_channels` = 4 (packs only) takes a zero 4th
    input channel per member and zero-pads the stem's weights to match in the forward: 4
    channels per group align for channels_last kernels where 3 do not, and the result is exact
    (the extra products are 0 * w and x * 0, the padded weights are no parameter, and the
    parameters and the state are those of 3 channels)."""

    def __init__(self, cfg: ModelConfig, members: int = 1, stem_channels: int = 3):
        super().__init__()
        if stem_channels not in (3, 4) or (stem_channels == 4 and members == 1):
            raise ValueError(f"stem_channels = {stem_channels}: 3, or 4 for a pack of several members")
        k = self.members = members
        self.stem_channels = stem_channels
        self.conv = nn.Conv2d(k * 3, k * STAGE_WIDTHS[0], 3, padding=1, bias=False, groups=k)
        self.bn = nn.BatchNorm2d(k * STAGE_WIDTHS[0])
        blocks = []
        in_ch = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            for i in range(cfg.n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, not cfg.plain, cfg.shortcut, k))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, cfg.num_classes) if k == 1 else MemberLinear(k, in_ch, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers"): fan_out, as in the authors' code.
        # (In a pack a grouped conv's fan_out counts every member: pack.build_pack overwrites
        # these with each member's own single-net initialisation.)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Linear, MemberLinear)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem_channels == 3:
            return self.conv(x)
        weight = F.pad(self.conv.weight, (0, 0, 0, 0, 0, 1))  # (K*16, 3, 3, 3) -> (K*16, 4, 3, 3), zeros
        return F.conv2d(x, weight, None, padding=1, groups=self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
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
