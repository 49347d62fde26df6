"""Lesion-wise tumor detection: which ground-truth tumors a prediction found, and what it invented.

Voxel metrics (Dice, HD95) are dominated by the largest tumor of a case: missing a 1 cm tumor next to a
7 cm one barely moves the tumor Dice. Whether each tumor was *found* is what a reader screening for small
renal masses needs, so this module counts tumors as objects. Pure numpy/scipy: label arrays in, counts
out, no files; both arrays on one voxel grid (``io.load.load_labels`` guarantees it, this module only
checks shapes).

The rule (:data:`LESION_RULE`, copied into ``summary.json``):

* **Tumors** are the 3D connected components of ``label == 2``, 26-connected (voxels touching by a face,
  an edge or a corner belong together), separately in the ground truth and in the prediction. With
  6-connectivity a tumor drawn slice by slice with a diagonal step would split in two and be counted twice.
* A ground-truth tumor is **found** when predicted tumor voxels (of any predicted component, together)
  cover at least ``min_overlap`` (default 0.1, i.e. 10 %) of its voxels. A low fraction because a
  prediction rarely covers a tumor exactly, yet one voxel touching it by chance must not count as a hit.
* A predicted tumor is a **false positive** when it touches no ground-truth tumor voxel at all. Any
  overlap, however small, makes it "not a false positive", so a prediction that grazes a tumor is not
  punished twice (the grazed tumor may still be missed if the covered fraction is below ``min_overlap``).
* **Nothing is dropped for being small**: every component counts, single voxels included, on both sides.
  A size filter would hide exactly the small tumors this is meant to measure; the size classes show them
  separately instead.
* **Size** of a tumor is its equivalent diameter: the diameter of the sphere of the same volume, with the
  volume from the voxel count and the voxel spacing (mm): ``d = (6 V / pi) ** (1/3)``. Ground-truth
  tumors are classed by their own diameter, false positives by theirs. Classes (:data:`SIZE_CLASSES`):
  ``<=20mm`` (d <= 20), ``20-40mm`` (20 < d <= 40), ``>40mm`` (d > 40), the usual T1a / T1b / larger split
  of renal masses at 4 cm with small ones (<= 2 cm) apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import GridMismatchError, InvalidOptionError

#: Default fraction of a ground-truth tumor's voxels that predicted tumor voxels must cover to find it.
DEFAULT_MIN_OVERLAP = 0.1

#: Tumor label in KiTS19 label maps.
TUMOR_LABEL = 2

#: Connectivity of tumor components: 26 (face, edge or corner neighbours in 3D).
CONNECTIVITY = 26

#: Size classes of the equivalent diameter: (key, lower bound exclusive, upper bound inclusive), in mm.
SIZE_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("<=20mm", 0.0, 20.0),
    ("20-40mm", 20.0, 40.0),
    (">40mm", 40.0, math.inf),
)

#: The matching rule in words, with ``{min_overlap}`` to fill in; see :func:`lesion_rule`.
LESION_RULE = (
    "Tumors are 3D 26-connected components of label 2, in ground truth and prediction separately; every "
    "component counts, single voxels included. A ground-truth tumor is found when predicted tumor voxels "
    "cover at least {min_overlap:g} of its voxels. A predicted tumor is a false positive when it touches "
    "no ground-truth tumor voxel. Size = equivalent diameter (sphere of the same volume, from voxel count "
    "and spacing); classes <=20mm (d <= 20), 20-40mm (20 < d <= 40), >40mm (d > 40); ground-truth tumors "
    "are classed by their own size, false positives by theirs. Sensitivity = found / ground-truth tumors "
    "pooled over the evaluated cases; false positives per case = false positives / evaluated cases."
)


def lesion_rule(min_overlap: float = DEFAULT_MIN_OVERLAP) -> str:
    """:data:`LESION_RULE` with the overlap fraction filled in (the text ``summary.json`` carries)."""
    return LESION_RULE.format(min_overlap=min_overlap)


def check_min_overlap(min_overlap: float) -> float:
    """``min_overlap`` as a float in (0, 1], or :class:`InvalidOptionError`.

    0 is refused: it would call every ground-truth tumor found, even one no predicted voxel touches.
    """
    try:
        value = float(min_overlap)
    except (TypeError, ValueError):
        value = math.nan
    if not (0.0 < value <= 1.0):
        raise InvalidOptionError(
            f"the lesion overlap must be a fraction in (0, 1], got {min_overlap!r}; e.g. 0.1 means a "
            "ground-truth tumor counts as found when predicted tumor voxels cover 10% of it"
        )
    return value


def equivalent_diameter_mm(n_voxels: int, spacing: Sequence[float]) -> float:
    """Diameter (mm) of the sphere whose volume is ``n_voxels`` voxels of size ``spacing`` (mm).

    A size that does not depend on the tumor's orientation or on the slice thickness, unlike the largest
    axial extent, so one number serves both isotropic and 5 mm-slice scans.
    """
    volume = int(n_voxels) * math.prod(float(s) for s in spacing)
    return float(np.cbrt(6.0 * volume / math.pi))


def size_class(diameter_mm: float) -> str:
    """The key of :data:`SIZE_CLASSES` holding ``diameter_mm``; upper bounds inclusive (20 -> ``<=20mm``)."""
    for key, lo, hi in SIZE_CLASSES:
        if lo < diameter_mm <= hi:
            return key
    raise ValueError(f"a tumor diameter must be a positive number of mm, got {diameter_mm!r}")


@dataclass(frozen=True)
class GtTumor:
    """One ground-truth tumor: its size, how much of it the prediction covers, and whether it was found."""

    voxels: int
    diameter_mm: float
    size_class: str
    covered_voxels: int
    covered_fraction: float
    found: bool


@dataclass(frozen=True)
class PredTumor:
    """One predicted tumor: its size and whether it is a false positive (touches no ground-truth tumor)."""

    voxels: int
    diameter_mm: float
    size_class: str
    false_positive: bool


@dataclass(frozen=True)
class LesionMatch:
    """Result of :func:`match_lesions` for one case; tumors in component-label order (scan order)."""

    gt: tuple[GtTumor, ...]
    pred: tuple[PredTumor, ...]
    min_overlap: float

    @property
    def n_gt(self) -> int:
        return len(self.gt)

    @property
    def n_found(self) -> int:
        return sum(t.found for t in self.gt)

    @property
    def n_false_positive(self) -> int:
        return sum(t.false_positive for t in self.pred)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per size class (keys of :data:`SIZE_CLASSES`): ``{"gt", "found", "false_positive"}`` counts."""
        out = {key: {"gt": 0, "found": 0, "false_positive": 0} for key, _, _ in SIZE_CLASSES}
        for t in self.gt:
            out[t.size_class]["gt"] += 1
            out[t.size_class]["found"] += int(t.found)
        for p in self.pred:
            out[p.size_class]["false_positive"] += int(p.false_positive)
        return out


_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every True voxel, or None when there is none."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def label_tumors(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 3D boolean mask: ``(labels, n)``, labels 1..n, 0 for background."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"tumor masks must be 3D, got {mask.ndim}D")
    labels, n = ndimage.label(mask, structure=_STRUCTURE_26)
    return labels, int(n)


def match_lesions(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Sequence[float],
    *,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> LesionMatch:
    """Match tumors (``label == 2`` components) of a prediction against the ground truth, by the module rule.

    ``spacing`` is the voxel size in mm along the arrays' axes. Work is done on the bounding box of both
    tumor masks: every tumor voxel lies inside it, so no component and no count changes, and a whole CT
    volume is never labelled (a label array of it would take several hundred MB).
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise GridMismatchError(
            f"prediction shape {pred_labels.shape} differs from ground truth shape {gt_labels.shape}; "
            "tumor matching needs both on the same voxel grid (nothing is resampled)"
        )
    sp = tuple(float(s) for s in spacing)
    if len(sp) != gt_labels.ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(
            f"spacing must be {gt_labels.ndim} positive finite numbers in mm, got {tuple(spacing)}"
        )
    min_overlap = check_min_overlap(min_overlap)

    pred_mask = pred_labels == TUMOR_LABEL
    gt_mask = gt_labels == TUMOR_LABEL
    box = _bbox(pred_mask | gt_mask)
    if box is None:
        return LesionMatch((), (), min_overlap)
    pred_mask, gt_mask = pred_mask[box], gt_mask[box]
    gt_comp, n_gt = label_tumors(gt_mask)
    pred_comp, n_pred = label_tumors(pred_mask)

    # Per ground-truth component: its voxels, and how many of them are predicted tumor (any component).
    gt_size = np.bincount(gt_comp.ravel(), minlength=n_gt + 1)
    gt_covered = np.bincount(gt_comp[pred_mask], minlength=n_gt + 1)
    # Per predicted component: its voxels, and how many of them are ground-truth tumor.
    pred_size = np.bincount(pred_comp.ravel(), minlength=n_pred + 1)
    pred_on_gt = np.bincount(pred_comp[gt_mask], minlength=n_pred + 1)

    gt_tumors = []
    for i in range(n_gt):
        size, covered = int(gt_size[i + 1]), int(gt_covered[i + 1])
        # A division, not ``covered >= min_overlap * size``: 0.1 * 30 is 3.0000000000000004 in floating
        # point, which would miss exactly 3 of 30 voxels, while 3 / 30 rounds to the same double as 0.1.
        fraction = covered / size
        d = equivalent_diameter_mm(size, sp)
        gt_tumors.append(GtTumor(size, d, size_class(d), covered, fraction, fraction >= min_overlap))
    pred_tumors = []
    for j in range(n_pred):
        size = int(pred_size[j + 1])
        d = equivalent_diameter_mm(size, sp)
        pred_tumors.append(PredTumor(size, d, size_class(d), int(pred_on_gt[j + 1]) == 0))
    return LesionMatch(tuple(gt_tumors), tuple(pred_tumors), min_overlap)


def summarize_lesions(
    matches: Sequence[LesionMatch], *, min_overlap: float = DEFAULT_MIN_OVERLAP
) -> dict[str, object]:
    """The ``lesions`` block of ``summary.json`` from the matches of the evaluated cases (one each).

    Counts are pooled over cases (sensitivity = all found / all ground-truth tumors), not averaged per case:
    most KiTS cases have one tumor, so a per-case mean would weigh a case with five tumors like one with one.
    A rate over nothing (no ground-truth tumor in a class, no evaluated case) is ``None`` (``null`` in JSON).
    """
    n_cases = len(matches)
    per_case = [m.counts() for m in matches]

    def block(gt: int, found: int, fp: int) -> dict[str, object]:
        return {
            "tumors_gt": gt,
            "tumors_found": found,
            "sensitivity": found / gt if gt else None,
            "false_positives": fp,
            "false_positives_per_case": fp / n_cases if n_cases else None,
        }

    by_size = {
        key: block(*(sum(c[key][k] for c in per_case) for k in ("gt", "found", "false_positive")))
        for key, _, _ in SIZE_CLASSES
    }
    overall = block(
        sum(m.n_gt for m in matches),
        sum(m.n_found for m in matches),
        sum(m.n_false_positive for m in matches),
    )
    return {
        "rule": lesion_rule(min_overlap),
        "min_overlap": float(min_overlap),
        "connectivity": CONNECTIVITY,
        "size_classes_mm": {key: [lo, None if math.isinf(hi) else hi] for key, lo, hi in SIZE_CLASSES},
        "n_cases": n_cases,
        "overall": overall,
        "by_size": by_size,
    }
