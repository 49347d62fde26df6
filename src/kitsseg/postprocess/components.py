"""Connected components of a mask and their measures: the shared ground of the post-processing steps.

All arrays are 3D in the internal frame ``(z, row, col)``. A real CT is 600x512x512, where a 3D labelling
costs 5 s while the masks occupy a few percent of it: components are labelled on the bounding box of their
mask (:func:`kitsseg.arrays.bounding_box`) and described in the full frame (:class:`Component`).

The eigenvalue ratio is ``l1 / l2`` of the covariance of the voxel INDEX coordinates on the original grid,
the definition that reproduces the paper's 1.07-2.8 on the KiTS19 labels (1.07-2.79 measured:
``tests/postprocess/test_shapestats.py::test_kits19_labels_reproduce_paper_bounds``); ``unit="mm"`` scales the
coordinates by the spacing first and needs bounds derived in the same unit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from ..arrays import bounding_box
from ..errors import GridMismatchError, InvalidImageError

Unit = Literal["voxel", "mm"]
Spacing = Sequence[float]


@dataclass(frozen=True)
class Component:
    """One 3D connected component, described in the full frame so reports can point at it.

    ``label`` is its number in a 3D labelling of the mask (raster order, 1-based); ``bbox`` holds
    ``(start, stop)`` per axis and ``centroid`` the mean voxel index ``(z, row, col)``. Fields that need the
    spacing or extra work are ``None`` when not computed. ``reason`` says why a removed component was removed
    (empty for kept ones); ``kind`` is ``"kidney"`` (kidney+tumor mask) or ``"tumor"``.
    """

    label: int
    voxels: int
    bbox: tuple[tuple[int, int], ...]
    centroid: tuple[float, ...]
    kind: str = ""
    volume_ml: float | None = None
    eigenvalue_ratio: float | None = None
    overlap: float | None = None
    max_axial_diameter_mm: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become ``None``, since JSON has no infinity)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out


# --------------------------------------------------------------------------------------------- helpers


def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """A 3D bool view/copy of ``mask`` (nonzero is foreground); bool input is not copied."""
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise InvalidImageError(
            f"{name} must be a 3D array in the (z, row, col) frame, got {arr.ndim}D with shape {arr.shape}"
        )
    return arr if arr.dtype == np.bool_ else arr != 0


def _check_spacing(spacing: Spacing | None, ndim: int = 3) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm (z, row, col), got {spacing!r}")
    return sp


def _same_grid(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise GridMismatchError(
            f"the two masks must share one voxel grid, got shapes {a.shape} and {b.shape}; "
            "pass the kidney+tumor and tumor masks of the same volume"
        )


def _structure(connectivity: int, ndim: int = 3) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be 1..{ndim} (3 = 26-connectivity in 3D), got {connectivity}")
    return ndimage.generate_binary_structure(ndim, connectivity)


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=_structure(connectivity, mask.ndim))
    return labels, int(n)


def _volume_ml(voxels: int, spacing: tuple[float, ...] | None) -> float | None:
    return None if spacing is None else voxels * float(np.prod(spacing)) / 1000.0


def _describe(
    labels: np.ndarray,
    index: int,
    box: tuple[slice, ...],
    offset: tuple[int, ...],
    spacing: tuple[float, ...] | None,
    *,
    kind: str,
) -> tuple[Component, np.ndarray, np.ndarray]:
    """Component ``index`` of a labelled crop: its description plus its local mask and coordinates."""
    local = labels[box] == index
    coords = np.nonzero(local)
    starts = tuple(o + s.start for o, s in zip(offset, box, strict=True))
    centroid = tuple(float(c.mean()) + st for c, st in zip(coords, starts, strict=True))
    bbox = tuple((st, st + s.stop - s.start) for st, s in zip(starts, box, strict=True))
    voxels = int(coords[0].size)
    comp = Component(
        label=index,
        voxels=voxels,
        bbox=bbox,
        centroid=centroid,
        kind=kind,
        volume_ml=_volume_ml(voxels, spacing),
    )
    return comp, local, np.stack(coords, axis=1)


def eigenvalue_ratio(
    mask_or_coords: np.ndarray,
    *,
    unit: Unit = "voxel",
    spacing: Spacing | None = None,
) -> float:
    """Largest over second-largest eigenvalue of the covariance of a component's voxel coordinates.

    ``mask_or_coords`` is either a bool mask of one component (any grid, cropping does not change the
    ratio) or an ``(N, ndim)`` array of voxel indices. ``unit="voxel"`` uses the index coordinates on the
    original grid, which reproduces the paper's 1.07-2.8 on the KiTS19 labels; ``unit="mm"`` scales them by
    ``spacing`` first. Eigenvalues, not their square roots: an ellipsoid with semi-axes a > b > c gives
    ``(a / b) ** 2``. A component with ``l2 == 0`` (all voxels on one line, or a single voxel) has no
    second direction and returns ``inf``, so any shape bound rejects it.
    """
    if unit not in ("voxel", "mm"):
        raise ValueError(f"unit must be 'voxel' or 'mm', got {unit!r}")
    arr = np.asarray(mask_or_coords)
    if arr.dtype == np.bool_ or arr.ndim != 2:
        coords = np.argwhere(arr)
    else:
        coords = arr
    coords = coords.astype(np.float64, copy=False)
    if unit == "mm":
        sp = _check_spacing(spacing, coords.shape[1])
        if sp is None:
            raise ValueError("unit='mm' needs the voxel spacing (z, row, col) in mm; pass spacing=...")
        coords = coords * np.asarray(sp)
    if coords.shape[0] < 2:
        return math.inf
    centred = coords - coords.mean(axis=0)
    cov = centred.T @ centred / (coords.shape[0] - 1)
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    l1, l2 = float(eig[0]), float(eig[1])
    if l2 <= 1e-12 * max(l1, 1e-300):
        return math.inf
    return l1 / l2


@dataclass(frozen=True)
class _TumorLabels:
    """A tumor mask's 3D labelling on its bounding box: computed apart from the judging, so that
    :func:`~kitsseg.postprocess.pipeline.postprocess` can label on its second thread while the kidney steps
    run."""

    shape: tuple[int, ...]
    box: tuple[slice, ...] | None
    labels: np.ndarray | None = None
    objects: list[tuple[slice, ...]] = field(default_factory=list)

    @classmethod
    def of(cls, mask: np.ndarray, connectivity: int) -> _TumorLabels:
        box = bounding_box(mask)
        if box is None:
            return cls(mask.shape, None)
        labels, _ = _label(mask[box], connectivity)
        return cls(mask.shape, box, labels, list(ndimage.find_objects(labels)))


# --------------------------------------------------------------------------------------------- morphometry


def max_axial_diameter(mask: np.ndarray, spacing: Spacing) -> float:
    """Largest in-plane (Feret) diameter in mm over the axial slices of ``mask`` (the RECIST-style size).

    Each pixel contributes the midpoints of its four edges, scaled by the row and column spacing (which may
    differ), so a run of n pixels measures n pixels, like marching squares. Slices are visited by the
    diagonal of their 2D bounding box, an upper bound of their diameter, and the search stops once no
    remaining slice can beat the best found: exact, but only a few convex hulls per component.
    """
    m = _as_mask(mask)
    sp = _check_spacing(spacing, 3)
    box = bounding_box(m)
    if box is None or sp is None:
        return 0.0
    crop = m[box]
    rs, cs = sp[1], sp[2]
    bounds = []
    for z in range(crop.shape[0]):
        sub = bounding_box(crop[z])
        if sub is None:
            continue
        h = (sub[0].stop - sub[0].start) * rs
        w = (sub[1].stop - sub[1].start) * cs
        bounds.append((math.hypot(h, w), z))
    bounds.sort(reverse=True)
    best = 0.0
    for upper, z in bounds:
        if upper <= best:
            break
        best = max(best, _slice_feret(crop[z], rs, cs))
    return best


def _slice_feret(slice_mask: np.ndarray, rs: float, cs: float) -> float:
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    # Only boundary pixels can carry hull points.
    edge = slice_mask & ~ndimage.binary_erosion(slice_mask, border_value=0)
    r, c = np.nonzero(edge)
    r = r.astype(np.float64)
    c = c.astype(np.float64)
    pts = np.concatenate(
        [
            np.stack([(r - 0.5) * rs, c * cs], axis=1),
            np.stack([(r + 0.5) * rs, c * cs], axis=1),
            np.stack([r * rs, (c - 0.5) * cs], axis=1),
            np.stack([r * rs, (c + 0.5) * cs], axis=1),
        ]
    )
    if pts.shape[0] > 64:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # collinear points: fall through to the exact pairwise search
            pts = np.unique(pts, axis=0)
    return float(pdist(pts).max()) if pts.shape[0] > 1 else 0.0


def component_stats(
    mask: np.ndarray,
    spacing: Spacing,
    *,
    connectivity: int = 3,
    unit: Unit = "voxel",
    kind: str = "",
) -> list[Component]:
    """Describe every connected component of ``mask``: voxels, volume (mL), centroid, bbox, eigenvalue
    ratio (in ``unit``) and largest axial diameter (mm), largest component first.

    For reports (kidney volumes per side, tumor morphometry); works on the mask's bounding box.
    """
    m = _as_mask(mask)
    sp = _check_spacing(spacing, m.ndim)
    box = bounding_box(m)
    if box is None:
        return []
    labels, _ = _label(m[box], connectivity)
    offset = tuple(s.start for s in box)
    out = []
    for idx, sub in enumerate(ndimage.find_objects(labels), start=1):
        comp, local, coords = _describe(labels, idx, sub, offset, sp, kind=kind)
        out.append(
            dataclasses.replace(
                comp,
                eigenvalue_ratio=eigenvalue_ratio(coords, unit=unit, spacing=sp),
                max_axial_diameter_mm=max_axial_diameter(local, sp) if sp is not None else None,
            )
        )
    out.sort(key=lambda c: (-c.voxels, c.label))
    return out


def kidney_side(component_centroid_col: float, n_cols: int) -> str:
    """``"right"`` or ``"left"`` (the patient's side) from a centroid column in the frame.

    Frame columns run from the patient's right to left (radiological view), so the image's left half,
    columns below ``n_cols / 2``, is the patient's RIGHT.
    """
    return "right" if component_centroid_col < n_cols / 2 else "left"
