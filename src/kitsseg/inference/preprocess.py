"""Slice preprocessing shared by training and inference, so the two can never drift apart.

A slice in the internal frame (rows anterior to posterior, columns patient right to left) is windowed to
the checkpoint's HU window and scaled to [0, 1], then resized to the model's input. The tumor model sees a
half-height band of the slice whose rows are placed per case around the kidney (the paper's fixed lower
half loses 16% of kidney tissue on the KiTS19 labels; a per-case band always fits).
"""

from __future__ import annotations

from dataclasses import dataclass

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


#: In-plane pixel spacing (mm) of the model grid for weights that do not say otherwise in their metadata
#: (``pixel_spacing_mm``). 1.5625 mm is twice the median KiTS in-plane spacing (0.78 mm over the real
#: slices' ``spacing_rc_mm``), so a median KiTS slice of 512 pixels fills the 256-pixel grid exactly
#: (400 mm field of view) and the typical training slice is resampled least.
MODEL_SPACING_MM = 1.5625


@dataclass(frozen=True)
class SliceGrid:
    """How one slice geometry maps onto a model's fixed grid: resample to the model's pixel spacing, then
    centre (pad or crop) on the grid.

    This is the one preprocessing geometry of kitsseg: the training slice sets, the KiTS19 slice cache and
    inference all build their network inputs through :meth:`to_model`, and inference brings probabilities
    back with :meth:`to_slice` before thresholding. A slice of ``height x width`` pixels at
    ``spacing_rc`` mm becomes ``scaled = round(height * spacing_r / model_spacing)`` rows (columns alike),
    placed with its centre on the grid's centre; what falls outside the grid is cropped (a field of view
    wider than ``grid * model_spacing`` mm), what the slice does not cover is filled with 0 (air after
    windowing). Non-square slices and anisotropic pixels need no special case.

    ``model_spacing`` ``None`` means the legacy geometry of weights trained before 0.5 (each slice fitted
    whole into the grid, whatever its pixel size): the longer side is scaled to the grid.
    """

    height: int
    width: int
    scaled_h: int
    scaled_w: int
    grid_h: int
    grid_w: int
    top: int  # grid row of the scaled slice's first row (negative: the slice is cropped)
    left: int

    @classmethod
    def for_slice(
        cls,
        shape: tuple[int, int],
        spacing_rc: tuple[float, float],
        grid: tuple[int, int],
        model_spacing: float | None,
    ) -> SliceGrid:
        height, width = int(shape[0]), int(shape[1])
        if model_spacing is None:
            factor = min(grid[0], grid[1]) / max(height, width)
            fr = fc = factor
        else:
            fr = float(spacing_rc[0]) / float(model_spacing)
            fc = float(spacing_rc[1]) / float(model_spacing)
        sh = max(1, int(round(height * fr)))
        sw = max(1, int(round(width * fc)))
        top, left = (grid[0] - sh) // 2, (grid[1] - sw) // 2
        return cls(height, width, sh, sw, int(grid[0]), int(grid[1]), top, left)

    @property
    def identity(self) -> bool:
        return (self.scaled_h, self.scaled_w, self.top, self.left) == (self.height, self.width, 0, 0) and (
            self.grid_h,
            self.grid_w,
        ) == (self.height, self.width)

    def to_model(self, x: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
        """``(N, C, height, width)`` -> ``(N, C, grid_h, grid_w)``: resample (antialiased when shrinking,
        so fine-pixel CT is not aliased), then pad with 0 / crop, centred. ``mode='nearest'`` for labels is
        not offered: resample label masks as float with bilinear and threshold at 0.5."""
        if self.identity:
            return x
        if (self.scaled_h, self.scaled_w) != (self.height, self.width):
            shrink = self.scaled_h < self.height or self.scaled_w < self.width
            x = F.interpolate(
                x, size=(self.scaled_h, self.scaled_w), mode=mode, align_corners=False, antialias=shrink
            )
        return _place(x, self.top, self.left, self.grid_h, self.grid_w)

    def to_slice(self, p: torch.Tensor) -> torch.Tensor:
        """``(N, C, grid_h, grid_w)`` probabilities -> ``(N, C, height, width)``: the inverse placement (0
        where the grid did not cover the slice), then bilinear resampling to the slice's pixels."""
        if self.identity:
            return p
        x = _place(p, -self.top, -self.left, self.scaled_h, self.scaled_w)
        if (self.scaled_h, self.scaled_w) != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return x


def _place(x: torch.Tensor, top: int, left: int, out_h: int, out_w: int) -> torch.Tensor:
    """Put ``x`` (N, C, h, w) at ``(top, left)`` of a zero ``(out_h, out_w)`` canvas (negative offsets
    crop)."""
    h, w = x.shape[-2:]
    return F.pad(x, (left, out_w - w - left, top, out_h - h - top), value=0.0)
