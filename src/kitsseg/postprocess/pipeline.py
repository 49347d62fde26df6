"""Post-processing of the two U-Net masks: the steps in order, their options, and the merge to labels.

The seed paper (section 2.2) cleans the raw network output in four steps: fill holes (:mod:`.fill`), keep
the two largest kidney+tumor structures (:mod:`.kidneys`), drop tumor components by shape and overlap
(:mod:`.tumors`), then merge both masks into labels 0/1/2. Each step is its own function with the shared
keyword names ``connectivity``, ``num_components`` and ``spacing``, so callers can switch steps on and off
and compare (:class:`PostprocessOptions`); pure functions, arrays in and arrays out.

Every step works on the bounding box of its mask (padded by one voxel so the outside stays connected),
which gives the same result as the full volume at a fraction of the cost.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..arrays import bounding_box
from .components import (
    Component,
    Spacing,
    Unit,
    _as_mask,
    _check_spacing,
    _same_grid,
    _structure,
    _TumorLabels,
)
from .fill import _fill_labelled, fill_holes
from .kidneys import keep_largest_components
from .tumors import PAPER_EIG_BOUNDS, PAPER_MIN_OVERLAP, _check_shape_test, _filter_labelled


@dataclass(frozen=True)
class PostprocessOptions:
    """Which post-processing steps run, and their parameters (every step can be switched off).

    With every step off, :func:`postprocess` returns the raw masks merged, so raw and post-processed output
    can be compared on the same footing. ``eig_bounds`` must be in ``unit``; bounds for ``"mm"`` come from
    ``kitsseg stats --unit mm``, not from the paper.
    """

    fill_holes: bool = True
    keep_kidneys: bool = True
    num_kidneys: int = 2
    #: Kidneys kept besides the largest must share some of its slices (see keep_largest_components).
    kidneys_same_level: bool = True
    #: Anchor on a left/right kidney pair rather than an unpaired larger blob (see keep_largest_components).
    kidney_pairs: bool = True
    tumor_shape: bool = True
    tumor_overlap: bool = True
    eig_bounds: tuple[float, float] = PAPER_EIG_BOUNDS
    #: Least fraction of a tumor inside the kidney+tumor mask. ``None``: the weights' ``min_overlap``
    #: when segmenting (:func:`kitsseg.segment`), else the paper's 0.95.
    min_overlap: float | None = None
    unit: Unit = "voxel"
    #: Tumors up to this sphere-equivalent diameter (mm) are held to the upper eigenvalue-ratio bound
    #: only: the lower bound ("too round") deletes 3 of the 27 real tumors of 2 cm or less in KiTS19
    #: (kitsseg.postprocess.tumors). 20 mm and not 40: on the non-contrast example CT the lower bound
    #: removes a 36 mm false-positive tumor that a 40 mm exemption would keep. ``None``: the paper's rule.
    round_exempt_mm: float | None = 20.0
    min_tumor_voxels: int = 10
    connectivity: int = 3
    #: Kidney pieces separated along z by missed slices spanning at most this many mm (and overlapping in
    #: the axial projection) count as one component when kidneys are chosen; 0 turns it off. A 2D model
    #: misses single slices of a kidney, which otherwise splits it into pieces that compete with false
    #: positives (see keep_largest_components). 10 mm: on the validation CT from outside KiTS (ircad_01)
    #: the kidney Dice after post-processing rose from 0.31 to 0.69 (the raw mask's own 0.69), on the
    #: example CT from 0.77 to 0.79 (docs/model-card.md).
    bridge_mm: float = 10.0

    @classmethod
    def none(cls) -> PostprocessOptions:
        """Every step off: the output is the raw network masks merged to labels."""
        return cls(fill_holes=False, keep_kidneys=False, tumor_shape=False, tumor_overlap=False)


@dataclass
class PostprocessResult:
    """Merged labels (uint8 0/1/2, frame layout) plus what was removed and the tumors that remain."""

    labels: np.ndarray
    removed: list[Component] = field(default_factory=list)
    tumors: list[Component] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"PostprocessResult(shape={self.labels.shape}, removed={len(self.removed)}, "
            f"tumors={len(self.tumors)})"
        )


def merge_labels(kidney_tumor: np.ndarray, tumor: np.ndarray) -> np.ndarray:
    """Labels 0 background, 1 kidney, 2 tumor (KiTS19 convention) as uint8.

    Tumor wins over kidney. A tumor voxel outside the kidney+tumor mask is still labelled 2: it survived the
    overlap filter (or the filter is off), so it is the tumor model's call.
    """
    kt = _as_mask(kidney_tumor, "kidney_tumor")
    t = _as_mask(tumor, "tumor")
    _same_grid(kt, t)
    out = kt.astype(np.uint8)
    np.copyto(out, np.uint8(2), where=t)
    return out


# --------------------------------------------------------------------------------------------- pipeline


def postprocess(
    kidney_tumor_mask: np.ndarray,
    tumor_mask: np.ndarray,
    options: PostprocessOptions | None = None,
    spacing: Spacing | None = None,
) -> PostprocessResult:
    """Run the paper's post-processing on the two network masks and merge them to labels.

    Order: fill holes in both masks; keep the ``num_kidneys`` largest kidney+tumor components; filter tumor
    components by shape and by overlap with the CLEANED kidney+tumor mask; merge (tumor wins). Inputs are not
    modified. ``tumors`` lists the tumor components that remain (with volume and largest axial diameter
    when ``spacing`` is given); ``removed`` lists everything dropped, each with its reason.
    """
    opts = options or PostprocessOptions()
    kt_full = _as_mask(kidney_tumor_mask, "kidney_tumor_mask")
    t_full = _as_mask(tumor_mask, "tumor_mask")
    _same_grid(kt_full, t_full)
    sp = _check_spacing(spacing, 3)
    _check_shape_test(opts.eig_bounds if opts.tumor_shape else None, opts.unit, sp)
    _structure(opts.connectivity)  # a bad connectivity fails here, not on a worker thread
    labels = np.zeros(kt_full.shape, dtype=np.uint8)  # calloc: pages outside the box are never touched
    box = _union_box(bounding_box(kt_full, pad=1), bounding_box(t_full, pad=1))
    if box is None:
        return PostprocessResult(labels=labels)
    # Every step is exact on a crop that keeps one background voxel around both masks (or reaches the
    # volume's edge, which is the edge for the full volume too), and the masks are a few percent of a CT:
    # the steps, their temporaries and the merge all work on that crop only.
    kt, t = kt_full[box], t_full[box]
    offset = tuple(s.start for s in box)
    removed: list[Component] = []

    # The tumor mask's hole filling does not depend on the kidney steps: it runs on a second thread
    # (scipy's labelling releases the GIL), beside the kidney mask's filling and component selection.
    def tumor_side() -> tuple[np.ndarray, _TumorLabels]:
        if opts.fill_holes and opts.connectivity == 3:  # the filling's own labelling is the one needed
            return _fill_labelled(t)
        filled = fill_holes(t) if opts.fill_holes else t
        return filled, _TumorLabels.of(filled, opts.connectivity)

    with ThreadPoolExecutor(1, thread_name_prefix="kitsseg-post") as pool:
        t_side = pool.submit(tumor_side)
        if opts.fill_holes:
            kt = fill_holes(kt)
        if opts.keep_kidneys:
            kt, dropped = keep_largest_components(
                kt,
                num_components=opts.num_kidneys,
                connectivity=opts.connectivity,
                spacing=sp,
                same_level=opts.kidneys_same_level,
                pairs=opts.kidney_pairs,
                frame_cols=(box[2].start, kt_full.shape[2]),
                bridge_mm=opts.bridge_mm,
            )
            removed.extend(dropped)
        t, t_labels = t_side.result()
    filtering = opts.tumor_shape or opts.tumor_overlap
    t_out, tumors, dropped = _filter_labelled(
        t_labels,
        kt,
        eig_bounds=opts.eig_bounds if opts.tumor_shape else None,
        min_overlap=(opts.min_overlap if opts.min_overlap is not None else PAPER_MIN_OVERLAP)
        if opts.tumor_overlap
        else None,
        min_voxels=opts.min_tumor_voxels if filtering else 0,
        unit=opts.unit,
        spacing=sp,
        round_exempt_mm=opts.round_exempt_mm,
    )
    if filtering:
        t = t_out
        removed.extend(dropped)
    labels[box] = merge_labels(kt, t)
    return PostprocessResult(
        labels=labels,
        removed=[_shifted(c, offset) for c in removed],
        tumors=[_shifted(c, offset) for c in tumors],
    )


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    """The smallest box holding both boxes (either may be ``None``: no voxels)."""
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _shifted(comp: Component, offset: tuple[int, ...]) -> Component:
    """``comp`` measured on a crop, moved to the full frame (bbox and centroid; the rest does not move)."""
    if not any(offset):
        return comp
    return dataclasses.replace(
        comp,
        bbox=tuple((a + o, b + o) for (a, b), o in zip(comp.bbox, offset, strict=True)),
        centroid=tuple(c + o for c, o in zip(comp.centroid, offset, strict=True)),
    )
