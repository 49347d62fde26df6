"""Tumor filtering: drop tumor components outside the tumor shape model or outside the kidney mask.

The seed paper (section 2.2) drops tumor components whose shape falls outside the tumor shape model (ratio
of the two largest eigenvalues between the 5th and 95th percentile of the ground truth, 1.07 to 2.8) or
that lie less than 95% inside the kidney+tumor mask.

The lower bound says "too round", which is what a small renal mass typically is: of the 125 tumors of 4 cm
or less (sphere-equivalent diameter) in the 209 KiTS19 label maps in ``../shared``, 10 (8%; 3 of 27 at
2 cm or less) have a ratio under 1.07 and the paper's rule would delete them, against 2 of 100 larger
ones. So tumors up to ``round_exempt_mm`` across (20 mm in the pipeline's defaults) are held to the upper
bound only (the false positives the upper bound removes are mostly small and elongated; docs/model-card.md).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .components import (
    Component,
    Spacing,
    Unit,
    _as_mask,
    _check_spacing,
    _describe,
    _same_grid,
    _TumorLabels,
    eigenvalue_ratio,
    max_axial_diameter,
)

#: The paper's tumor shape bounds (voxel-index units; the KiTS19 labels give 1.07-2.79: module docstring).
PAPER_EIG_BOUNDS = (1.07, 2.8)
#: The paper's tumor-in-kidney overlap threshold (weights may carry their own, measured on validation).
PAPER_MIN_OVERLAP = 0.95


def filter_tumors(
    tumor: np.ndarray,
    kidney_tumor: np.ndarray,
    *,
    eig_bounds: tuple[float, float] | None = PAPER_EIG_BOUNDS,
    min_overlap: float | None = 0.95,
    connectivity: int = 3,
    min_voxels: int = 10,
    unit: Unit = "voxel",
    spacing: Spacing | None = None,
    round_exempt_mm: float | None = None,
) -> tuple[np.ndarray, list[Component], list[Component]]:
    """Keep 3D tumor components that look like kidney tumors and lie inside the kidney+tumor mask.

    A component is removed if it has fewer than ``min_voxels`` voxels (a speck: its eigenvalues mean
    nothing), if its eigenvalue ratio lies outside ``eig_bounds`` (inclusive; the tumor shape model), or if
    less than ``min_overlap`` of its voxels lie inside ``kidney_tumor`` (the first model segments kidney
    and tumor together, so a real tumor lies inside it; 95% rather than 100% because the tumor model's
    boundary can be the better one). ``eig_bounds=None`` or ``min_overlap=None`` switches that test off.
    ``round_exempt_mm`` (needs ``spacing``): a component whose sphere-equivalent diameter is at most this
    many mm is not removed for a ratio under the lower bound (module docstring); ``None``: the paper's rule.
    Returns the filtered mask, the kept and the removed components, each with its measures and reason;
    kept components also carry their largest axial diameter when ``spacing`` is given.
    """
    t = _as_mask(tumor, "tumor")
    kt = _as_mask(kidney_tumor, "kidney_tumor")
    _same_grid(t, kt)
    sp = _check_spacing(spacing, t.ndim)
    _check_shape_test(eig_bounds, unit, sp)
    return _filter_labelled(
        _TumorLabels.of(t, connectivity),
        kt,
        eig_bounds=eig_bounds,
        min_overlap=min_overlap,
        min_voxels=min_voxels,
        unit=unit,
        spacing=sp,
        round_exempt_mm=round_exempt_mm,
    )


def equivalent_diameter_mm(voxels: int, spacing: tuple[float, ...]) -> float:
    """Diameter in mm of the sphere with the component's volume."""
    volume = voxels * float(np.prod(spacing))
    return float(2.0 * (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0))


def _check_shape_test(
    eig_bounds: tuple[float, float] | None, unit: Unit, sp: tuple[float, ...] | None
) -> None:
    """The shape test's arguments, checked before any work (also for
    :func:`~kitsseg.postprocess.pipeline.postprocess`)."""
    if eig_bounds is not None and not eig_bounds[0] <= eig_bounds[1]:
        raise ValueError(f"eig_bounds must be (low, high) with low <= high, got {eig_bounds!r}")
    if unit == "mm" and eig_bounds is not None and sp is None:
        raise ValueError("unit='mm' needs the voxel spacing (z, row, col) in mm; pass spacing=...")


def _filter_labelled(
    tl: _TumorLabels,
    kt: np.ndarray,
    *,
    eig_bounds: tuple[float, float] | None,
    min_overlap: float | None,
    min_voxels: int,
    unit: Unit,
    spacing: tuple[float, ...] | None,
    round_exempt_mm: float | None = None,
) -> tuple[np.ndarray, list[Component], list[Component]]:
    """:func:`filter_tumors` on a labelled tumor mask (same rules, same results)."""
    sp = spacing
    if tl.box is None or tl.labels is None:
        return np.zeros(tl.shape, dtype=bool), [], []
    box, labels, n = tl.box, tl.labels, len(tl.objects)
    kt_crop = kt[box]
    offset = tuple(s.start for s in box)
    keep = np.zeros(n + 1, dtype=bool)
    kept: list[Component] = []
    removed: list[Component] = []
    for idx, sub in enumerate(tl.objects, start=1):
        comp, local, coords = _describe(labels, idx, sub, offset, sp, kind="tumor")
        overlap = float(kt_crop[sub][local].mean())
        measurable = comp.voxels >= min_voxels and (unit == "voxel" or sp is not None)
        ratio = eigenvalue_ratio(coords, unit=unit, spacing=sp) if measurable else None
        comp = dataclasses.replace(comp, overlap=overlap, eigenvalue_ratio=ratio)
        reason = ""
        low = eig_bounds[0] if eig_bounds is not None else 0.0
        if (
            round_exempt_mm is not None
            and sp is not None
            and equivalent_diameter_mm(comp.voxels, sp) <= round_exempt_mm
        ):
            low = -math.inf  # a small tumor may be as round as it likes
        if comp.voxels < min_voxels:
            reason = f"speck of {comp.voxels} voxels (under {min_voxels})"
        elif eig_bounds is not None and ratio is not None and not low <= ratio <= eig_bounds[1]:
            reason = f"eigenvalue ratio {ratio:.2f} outside [{eig_bounds[0]:g}, {eig_bounds[1]:g}] ({unit})"
        elif min_overlap is not None and overlap < min_overlap:
            reason = f"only {overlap:.0%} inside kidney+tumor mask (needs {min_overlap:.0%})"
        if reason:
            removed.append(dataclasses.replace(comp, reason=reason))
        else:
            keep[idx] = True
            if sp is not None:  # only kept tumors are measured: they are few and go into reports
                comp = dataclasses.replace(comp, max_axial_diameter_mm=max_axial_diameter(local, sp))
            kept.append(comp)
    out = np.zeros(tl.shape, dtype=bool)
    out[box] = keep[labels]
    return out, kept, removed
