"""Tumors as objects on training slices: lesion-wise validation counts and size-balanced loss weights.

Pooled Dice, the score that picks a tumor network's epoch by default, is dominated by large tumors: a 6 cm
tumor has 16 times the pixels of a 1.5 cm one, so an epoch that finds every small tumor and one that finds
none can score alike. Both tools here count tumors as objects instead, on the 2D slices the networks are
trained on (8-connected regions of a slice's tumor mask, the 2D analogue of the 26-connected rule of
:mod:`kitsseg.evaluation.lesions`):

* :func:`lesion_counts` -- the validation counts behind ``select_by: "lesion_f1"``: a ground-truth region
  is found when the prediction covers at least 10 % of it (:data:`~kitsseg.evaluation.lesions.
  DEFAULT_MIN_OVERLAP`, the rule of ``kitsseg evaluate``), a predicted region that touches no ground-truth
  tumor is a false positive, sizes by equivalent diameter (the disc of the same area) in the classes of
  ``kitsseg evaluate``. The lesion F1 ``2 found / (2 found + missed + false positives)`` weighs each tumor
  once, whatever its size, and charges every invented region.
* :func:`lesion_weights` -- per-pixel weights for the BCE term of the loss (the stage option
  ``small_lesion_weight``): each tumor region smaller than a 4 cm disc gets the weight that gives it the
  BCE mass of a 4 cm one (``(40 / d)^2``), capped. Missing a 1.5 cm tumor then costs about what missing a
  4 cm one does, where it cost 1/7 of it (the object-balanced weighting of Kofler et al., "blob loss",
  2023, in its simplest form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from ..evaluation.lesions import DEFAULT_MIN_OVERLAP, SIZE_CLASSES, size_class

#: Equivalent diameter (mm) whose area the size-balanced weights give every smaller tumor: the 4 cm bound
#: of a small renal mass (T1a).
REFERENCE_DIAMETER_MM = 40.0

_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def disc_diameter_mm(pixels: int | np.ndarray, pixel_mm: float) -> np.ndarray:
    """Equivalent diameter of a 2D region: the disc of the same area, ``2 sqrt(A / pi)``."""
    return 2.0 * np.sqrt(np.asarray(pixels, dtype=np.float64) * pixel_mm * pixel_mm / math.pi)


@dataclass
class LesionTally:
    """Lesion counts pooled over slices: per size class found / ground truth, and false-positive regions."""

    found: dict[str, int] = field(default_factory=lambda: {k: 0 for k, _, _ in SIZE_CLASSES})
    total: dict[str, int] = field(default_factory=lambda: {k: 0 for k, _, _ in SIZE_CLASSES})
    false_positive: int = 0

    @property
    def f1(self) -> float:
        """``2 found / (2 found + missed + false positives)``; 1.0 with nothing to find and none invented."""
        found = sum(self.found.values())
        missed = sum(self.total.values()) - found
        denom = 2 * found + missed + self.false_positive
        return 1.0 if denom == 0 else 2.0 * found / denom

    def add(self, other: LesionTally) -> None:
        for k in self.found:
            self.found[k] += other.found[k]
            self.total[k] += other.total[k]
        self.false_positive += other.false_positive

    def to_dict(self) -> dict[str, object]:
        """Compact form for the training log: ``{"<=20mm": "found/total", ..., "fp": n}``."""
        out: dict[str, object] = {k: f"{self.found[k]}/{self.total[k]}" for k in self.found}
        out["fp"] = self.false_positive
        return out


def lesion_counts(pred: np.ndarray, target: np.ndarray, pixel_mm: float) -> LesionTally:
    """Lesion-wise counts of boolean ``(N, H, W)`` (or ``(H, W)``) prediction against target, slice by
    slice, by the module rule."""
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    tally = LesionTally()
    for p, t in zip(pred, target, strict=True):
        if t.any():
            lab, n = ndimage.label(t, structure=_STRUCTURE_8)
            size = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            covered = np.bincount(lab[p], minlength=n + 1)[1:]
            for d, s, c in zip(disc_diameter_mm(size, pixel_mm), size, covered, strict=True):
                key = size_class(float(d))
                tally.total[key] += 1
                tally.found[key] += int(c / s >= DEFAULT_MIN_OVERLAP)
        if p.any():
            plab, pn = ndimage.label(p, structure=_STRUCTURE_8)
            on_target = np.bincount(plab[t], minlength=pn + 1)[1:]
            tally.false_positive += int((on_target == 0).sum())
    return tally


def lesion_weights(target: torch.Tensor, pixel_mm: float, max_weight: float) -> torch.Tensor:
    """Per-pixel BCE weights for a ``(N, 1, H, W)`` target: 1 everywhere except on tumor regions smaller
    than :data:`REFERENCE_DIAMETER_MM`, which get ``min(max_weight, (40 / d)^2)`` (``d``: the region's
    equivalent diameter in mm). ``max_weight <= 1`` gives all ones (no balancing)."""
    weights = torch.ones(target.shape, dtype=torch.float32)
    if max_weight <= 1.0:
        return weights
    mask = (target > 0.5).cpu().numpy()
    for i in range(mask.shape[0]):
        t = mask[i, 0]
        if not t.any():
            continue
        lab, n = ndimage.label(t, structure=_STRUCTURE_8)
        size = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        d = disc_diameter_mm(size, pixel_mm)
        w = np.clip((REFERENCE_DIAMETER_MM / np.maximum(d, 1e-6)) ** 2, 1.0, max_weight)
        table = np.concatenate([[1.0], w]).astype(np.float32)
        weights[i, 0] = torch.from_numpy(table[lab])
    return weights.to(target.device)
