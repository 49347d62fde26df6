"""Slice preprocessing shared by training and inference, so the two can never drift apart.

A slice in the internal frame (rows anterior to posterior, columns patient right to left) is windowed to
the checkpoint's HU window and scaled to [0, 1], then resized to the model's input. The tumor model sees a
half-height band of the slice whose rows are placed per case around the kidney (the paper's fixed lower
half loses 16% of kidney tissue, REFERENCE section 2; a per-case band always fits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KIDNEY_INPUT = (256, 256)
TUMOR_INPUT = (128, 256)
BAND_FRACTION = 0.5


def window(hu: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clip HU to ``[lo, hi]`` and scale to ``[0, 1]`` (float32)."""
    x = hu.to(torch.float32)
    return ((x.clamp(lo, hi) - lo) / float(hi - lo)).clamp_(0.0, 1.0)


def window_(hu: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """:func:`window` in place on a float32 tensor the caller owns: one pass, no temporaries (inference)."""
    if hu.dtype != torch.float32:
        raise TypeError(f"window_ works in place on float32, got {hu.dtype}")
    return hu.clamp_(lo, hi).sub_(lo).mul_(1.0 / float(hi - lo)).clamp_(0.0, 1.0)


def resize(x: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize a ``(N, C, H, W)`` batch; ``mode='nearest'`` for labels, bilinear for images/probabilities."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def band_start(row_min: int, row_max: int, height: int, fraction: float = BAND_FRACTION) -> int:
    """First row of a band of ``round(height * fraction)`` rows centred on rows ``row_min..row_max``.

    The band is clamped into the image, so it always has its full height. Used per case at inference
    (rows spanned by the kidney model's output) and per case or slice in training (ground-truth rows).
    """
    band = band_height(height, fraction)
    centre = (row_min + row_max + 1) / 2.0
    start = int(round(centre - band / 2.0))
    return max(0, min(start, height - band))


def band_height(height: int, fraction: float = BAND_FRACTION) -> int:
    return max(1, int(round(height * fraction)))
