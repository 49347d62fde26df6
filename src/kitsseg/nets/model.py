"""A 2D U-Net built from small named blocks, with its architecture as a frozen dataclass.

The config travels inside every checkpoint (see :mod:`kitsseg.weights.checkpoint`), so a weights file alone is
enough to rebuild the network that made it. Two presets matter: :meth:`UNetConfig.paper` is the original
U-Net of the seed paper (64 base channels, 4 poolings, transposed-convolution up-sampling), and
:meth:`UNetConfig.cpu_default` is a lighter network sized for a laptop CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Norm = Literal["batch", "instance", "none"]
Upsample = Literal["transpose", "bilinear"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net; everything needed to rebuild it from a checkpoint.

    Attributes
    ----------
    in_channels:
        Input channels (1: one windowed CT slice).
    base_width:
        Channels of the first level; each pooling doubles them.
    depth:
        Number of poolings (the input side must be divisible by ``2 ** depth``).
    norm:
        Normalisation after each convolution. ``"none"`` reproduces the original U-Net.
    upsample:
        ``"transpose"`` (the paper's learned up-convolution) or ``"bilinear"`` (cheaper, no checkerboard).
    """

    in_channels: int = 1
    base_width: int = 16
    depth: int = 4
    norm: Norm = "batch"
    upsample: Upsample = "transpose"

    @classmethod
    def paper(cls) -> UNetConfig:
        """The seed paper's network: the original U-Net, 64 base channels, 4 poolings, no norm."""
        return cls(in_channels=1, base_width=64, depth=4, norm="none", upsample="transpose")

    @classmethod
    def cpu_default(cls) -> UNetConfig:
        """A light network for CPUs: 16 base channels (about 1/16 of the paper's FLOPs)."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by optional norm and ReLU (one U-Net level)."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max-pool by 2, then a double convolution."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, norm))


class Up(nn.Module):
    """Up-sample by 2, concatenate the skip connection, then a double convolution."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm, upsample: Upsample) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, 1),
            )
        self.conv = DoubleConv(out_ch * 2, out_ch, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net returning one channel of logits (apply a sigmoid for probabilities).

    The seed paper uses a single sigmoid output per model (kidney+tumor, or tumor) instead of a softmax.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c, w = self.config, self.config.base_width
        widths = [w * 2**i for i in range(c.depth + 1)]
        self.inc = DoubleConv(c.in_channels, widths[0], c.norm)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], c.norm) for i in range(c.depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], c.norm, c.upsample) for i in reversed(range(c.depth))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        init_gaussian(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_channels, H, W)`` to logits ``(N, 1, H, W)``.

        ``H`` and ``W`` must be divisible by ``2 ** depth`` (16 for the default depth of 4).
        """
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)


def init_gaussian(module: nn.Module) -> None:
    """Gaussian weights, zero bias, as in the seed paper.

    The standard deviation is He's ``sqrt(2 / fan_in)``: a fixed small sigma makes a deep ReLU network
    without normalisation start with vanishing activations, the failure the original U-Net paper warns of.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            if isinstance(m, nn.ConvTranspose2d):
                fan_in = m.weight.shape[0] * m.weight.shape[2] * m.weight.shape[3] // 4
            nn.init.normal_(m.weight, 0.0, (2.0 / max(fan_in, 1)) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
