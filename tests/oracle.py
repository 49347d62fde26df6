"""Hand-set tiny U-Nets whose output is known in advance, and weights files made of them.

An untrained network gives arbitrary masks, so the tests build "oracle" networks by setting weights:
a constant network (all weights zero, head bias +-10) says foreground everywhere or nowhere, and a
band-pass network says foreground where the windowed intensity lies in ``[lo, hi)``. With them band
placement, the kidney-slices-only rule and the resizing can be checked voxel for voxel, and the segment,
CLI and robustness tests get weights that find the phantom's kidneys and tumor. A helper module (like
``httpserver.py``), imported by name: test modules do not import each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kitsseg.nets.model import UNet, UNetConfig
from kitsseg.weights.checkpoint import StageModel, WeightsBundle, save_bundle

TINY = UNetConfig(base_width=4, depth=2, norm="none")


def constant_unet(logit: float, config: UNetConfig = TINY) -> UNet:
    """A U-Net whose output is ``logit`` everywhere (all weights zero, head bias ``logit``)."""
    net = UNet(config)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.bias.fill_(logit)
    return net.eval()


def band_pass_unet(lo: float, hi: float, config: UNetConfig = TINY) -> UNet:
    """A U-Net saying foreground where the windowed input ``x`` has ``lo + 0.0125 < x < hi`` (about).

    Channel 0 of the first level carries ``relu(x - lo)``, channel 1 ``relu(x - hi)``; the centre taps of
    the 3x3 convolutions pass them unchanged through the top level's skip connection, and the head gives
    ``40 * ch0 - 400 * ch1 - 0.5``. Everything else is zero, so the deeper levels add nothing.
    """
    net = UNet(config)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        first, second = net.inc[0], net.inc[3]
        first.weight[0, 0, 1, 1] = 1.0
        first.weight[1, 0, 1, 1] = 1.0
        first.bias[0], first.bias[1] = -lo, -hi
        second.weight[0, 0, 1, 1] = 1.0
        second.weight[1, 1, 1, 1] = 1.0
        top = net.ups[-1].conv  # input: cat([skip, up]) -> the skip's channels come first
        for conv in (top[0], top[3]):
            conv.weight[0, 0, 1, 1] = 1.0
            conv.weight[1, 1, 1, 1] = 1.0
        net.head.weight[0, 0, 0, 0] = 40.0
        net.head.weight[0, 1, 0, 0] = -400.0
        net.head.bias[0] = -0.5
    return net.eval()


def make_bundle(
    kidney: UNet,
    tumor: UNet | None,
    *,
    kidney_size: tuple[int, int] = (64, 64),
    tumor_size: tuple[int, int] = (32, 64),
    meta: dict | None = None,
) -> WeightsBundle:
    stages = {"kidney": StageModel(kidney, kidney_size)}
    if tumor is not None:
        stages["tumor"] = StageModel(tumor, tumor_size)
    metadata = {"hu_window": [0, 255], "eig_bounds": [1.0, 100.0], "name": "oracle", **(meta or {})}
    return WeightsBundle(stages["kidney"], stages.get("tumor"), metadata)


def write_oracle_weights(path: Path, *, tumor: bool = True, meta: dict | None = None) -> Path:
    """Weights whose kidney model finds about 49-249 HU (phantom kidney + tumor; not fat, soft tissue at
    40 HU or bone) and whose tumor model finds about 49-121 HU (phantom tumor at 60-90 HU, not kidney at
    150-200 HU), with HU window [0, 255]."""
    stages = {"kidney": StageModel(band_pass_unet(0.18, 0.9), (64, 64))}
    if tumor:
        stages["tumor"] = StageModel(band_pass_unet(0.18, 0.45), (32, 64))
    metadata = {
        "hu_window": [0, 255],
        "eig_bounds": [1.0, 100.0],
        "name": "oracle",
        "version": "0",
        **(meta or {}),
    }
    return save_bundle(path, stages, metadata)
