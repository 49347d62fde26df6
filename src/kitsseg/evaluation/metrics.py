"""Segmentation metrics for KiTS label volumes, and the one rule for empty masks.

Everything here is pure numpy/scipy: label arrays in, numbers out, no files. Both arrays must describe the
same voxel grid in the same frame (``io.load.load_labels`` guarantees that; this module only checks shapes).

Regions follow the KiTS19 official evaluation (``starter_code/evaluation.py``): ``kidney_tumor`` is the
composite ``label > 0`` and ``tumor`` is ``label == 2``; ``kidney`` (``label == 1``, kidney tissue without
tumor) is reported as well because a model can trade one for the other inside the composite.

Empty masks
-----------
The KiTS19 script yields NaN when both masks are empty, KiTS23 scores that 1.0, nnU-Net NaN. kitsseg decides
once, here (:data:`EMPTY_MASK_RULE`), and writes the rule into every summary:

* Dice and surface Dice: both masks empty -> NaN ("undefined"), left out of every mean, median, etc.; the
  summary's ``n`` says how many cases each statistic is over. Exactly one empty -> 0.0 (a missed or an
  invented structure is a complete miss, and must pull the mean down).
* HD95: NaN whenever either mask is empty (a distance to nothing does not exist); left out the same way.
  A case whose tumor was missed therefore lowers the tumor Dice and surface Dice but is absent from the
  tumor HD95 mean; read HD95 together with its ``n``.

Surface metrics
---------------
Surface voxels are the voxels of a mask that touch the background through a face (the mask minus its
6-connected erosion; outside the array counts as background). Distances are Euclidean in mm, using the
voxel spacing, from each surface voxel of one mask to the nearest surface voxel of the other, computed with
``scipy.ndimage.distance_transform_edt(sampling=spacing)`` on the bounding box of both masks plus a margin
(all surface voxels lie inside it, so the crop changes no distance and saves most of the work).

* HD95 is the larger of the two directed 95th percentiles (``numpy.percentile``, linear interpolation), as
  in MONAI's ``compute_hausdorff_distance(percentile=95)``.
* Surface Dice at tolerance ``tau`` mm is the fraction of both surfaces (voxel counts) lying within
  ``tau`` of the other surface: ``(|{a in S_p: d(a, S_g) <= tau}| + |{b in S_g: d(b, S_p) <= tau}|) /
  (|S_p| + |S_g|)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from ..arrays import bounding_box
from ..errors import GridMismatchError

#: The empty-mask rule, in words; copied verbatim into ``summary.json`` and the docs.
EMPTY_MASK_RULE = (
    "Dice and surface Dice: both masks empty -> NaN (undefined, excluded from summary statistics); "
    "exactly one empty -> 0.0. HD95: NaN (excluded) when either mask is empty. "
    "Every summary statistic states n, the number of cases it is computed over."
)

#: Default tolerance of the surface Dice, in mm.
DEFAULT_TOLERANCE_MM = 2.0

#: KiTS regions: name -> function from a label array to a boolean mask.
REGIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "kidney_tumor": lambda labels: labels > 0,
    "tumor": lambda labels: labels == 2,
    "kidney": lambda labels: labels == 1,
}

#: Short names used in volume column names (``vol_pred_kt_ml``...).
REGION_SHORT = {"kidney_tumor": "kt", "tumor": "tumor", "kidney": "kidney"}

#: Regions that get surface metrics (the two KiTS19 scores); kidney-only surfaces add little.
SURFACE_REGIONS = ("kidney_tumor", "tumor")

#: Voxels added around the union bounding box before the distance transform.
BBOX_MARGIN = 2


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of ``region`` (one of :data:`REGIONS`) in a label array."""
    try:
        return REGIONS[region](np.asarray(labels))
    except KeyError:
        raise ValueError(f"unknown region {region!r}; expected one of {sorted(REGIONS)}") from None


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise GridMismatchError(
            f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}; "
            "metrics need both on the same voxel grid (nothing is resampled)"
        )


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers in mm, got {tuple(spacing)}")
    return sp


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice ``2|P & G| / (|P| + |G|)`` of two boolean masks, with the empty-mask rule.

    Returns NaN when both are empty and 0.0 when exactly one is (:data:`EMPTY_MASK_RULE`).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt)
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    if n_pred + n_gt == 0:
        return math.nan
    inter = int(np.count_nonzero(pred & gt))
    return 2.0 * inter / (n_pred + n_gt)


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a boolean mask in mL: voxel count times voxel volume (mm^3) / 1000."""
    mask = np.asarray(mask, dtype=bool)
    sp = _check_spacing(spacing, mask.ndim)
    return int(np.count_nonzero(mask)) * float(np.prod(sp)) / 1000.0


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: mask voxels with a face neighbour in the background (outside counts as background)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every surface voxel of ``pred`` to ``gt``'s surface, and back.

    Both masks must be non-empty (callers apply the empty-mask rule first). Work is done on the bounding box
    of both masks plus :data:`BBOX_MARGIN` voxels, which contains every surface voxel, so no distance changes.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt)
    sp = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    box = bounding_box(pred | gt, BBOX_MARGIN) or ()  # never None here: both masks are non-empty
    # Cropping never cuts a mask (the box holds both), and outside the array counts as background in
    # ``surface`` either way, so the surfaces found in the crop are exactly those of the full arrays.
    s_pred = surface(pred[box])
    s_gt = surface(gt[box])
    to_gt = ndimage.distance_transform_edt(~s_gt, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp)
    return np.asarray(to_gt[s_pred], dtype=np.float64), np.asarray(to_pred[s_gt], dtype=np.float64)


def surface_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> tuple[float, float]:
    """``(hd95_mm, surface_dice)`` of two boolean masks, from one pair of distance transforms.

    Empty-mask rule: both empty -> ``(nan, nan)``; one empty -> ``(nan, 0.0)``.
    """
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt)
    _check_spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return math.nan, math.nan
    if not has_pred or not has_gt:
        return math.nan, 0.0
    d_pred, d_gt = surface_distances(pred, gt, spacing)
    hd95 = max(float(np.percentile(d_pred, 95)), float(np.percentile(d_gt, 95)))
    within = int(np.count_nonzero(d_pred <= tolerance_mm)) + int(np.count_nonzero(d_gt <= tolerance_mm))
    return hd95, within / (d_pred.size + d_gt.size)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; NaN when either mask is empty."""
    return surface_metrics(pred, gt, spacing)[0]


def surface_dice(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_TOLERANCE_MM
) -> float:
    """Surface Dice at ``tolerance_mm``; NaN when both masks are empty, 0.0 when exactly one is."""
    return surface_metrics(pred, gt, spacing, tolerance_mm)[1]


#: Metric columns of one case, in output order.
METRIC_NAMES: tuple[str, ...] = (
    *(f"dice_{r}" for r in REGIONS),
    *(
        f"vol_{kind}_{REGION_SHORT[r]}_ml"
        for r in ("kidney_tumor", "tumor", "kidney")
        for kind in ("pred", "gt", "diff")
    ),
    *(f"hd95_{r}_mm" for r in SURFACE_REGIONS),
    *(f"surface_dice_{r}" for r in SURFACE_REGIONS),
)


def case_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Sequence[float],
    *,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> dict[str, float]:
    """All metrics of one case (keys :data:`METRIC_NAMES`) from two label arrays on the same grid.

    ``vol_diff_*`` is prediction minus ground truth, in mL. ``spacing`` is the voxel size in mm along the
    arrays' axes.
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    _check_pair(pred_labels, gt_labels)
    sp = _check_spacing(spacing, gt_labels.ndim)
    out: dict[str, float] = {}
    masks = {r: (region_mask(pred_labels, r), region_mask(gt_labels, r)) for r in REGIONS}
    for r, (p, g) in masks.items():
        out[f"dice_{r}"] = dice(p, g)
    for r in ("kidney_tumor", "tumor", "kidney"):
        p, g = masks[r]
        short = REGION_SHORT[r]
        vp, vg = volume_ml(p, sp), volume_ml(g, sp)
        out[f"vol_pred_{short}_ml"] = vp
        out[f"vol_gt_{short}_ml"] = vg
        out[f"vol_diff_{short}_ml"] = vp - vg
    for r in SURFACE_REGIONS:
        p, g = masks[r]
        out[f"hd95_{r}_mm"], out[f"surface_dice_{r}"] = surface_metrics(p, g, sp, tolerance_mm)
    return {name: out[name] for name in METRIC_NAMES}


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, median, std (population, ddof=0), min, max over the finite values, and n (how many).

    NaN values (undefined by the empty-mask rule) are left out and counted in ``n_undefined``; statistics
    of no values are ``None`` (``null`` in JSON).
    """
    arr = np.asarray(list(values), dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    stats: dict[str, float | int | None] = {
        "mean": float(finite.mean()) if n else None,
        "median": float(np.median(finite)) if n else None,
        "std": float(finite.std()) if n else None,
        "min": float(finite.min()) if n else None,
        "max": float(finite.max()) if n else None,
        "n": n,
        "n_undefined": int(arr.size - n),
    }
    return stats
