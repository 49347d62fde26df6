"""Hole filling in 3D, per connected component on its own box (the first post-processing step).

The seed paper (section 2.2) fills the holes of both network masks before anything else; a full-volume
``binary_fill_holes`` costs 17 s on a 600x512x512 CT, the per-component filling here a fraction of it
with the same result.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..arrays import bounding_box
from .components import _as_mask, _label, _TumorLabels


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill 3D cavities (background not connected to the outside through 6-connected background).

    3D rather than per-slice filling: the ground truth itself gains only 0.14% volume from 3D filling but
    0.84% (up to 4.4%) from 2D filling, which would paint over real concavities (KiTS19 labels). Equal
    to ``scipy.ndimage.binary_fill_holes`` on the whole volume (tested on random masks), computed per
    26-connected component on its own padded box: a 6-connected cavity is enclosed by one 26-connected
    component (26/6 is a well-behaved pair of adjacencies in digital topology), so the work follows the
    components' boxes rather than the box around all of them, which for scattered detections (a tumor
    model's false positives across the abdomen) is most of the CT. A component less than 3 voxels thick
    along any axis encloses nothing and is skipped.
    """
    return _fill_labelled(_as_mask(mask))[0]


def _fill_labelled(m: np.ndarray) -> tuple[np.ndarray, _TumorLabels]:
    """:func:`fill_holes` of the bool mask ``m``, with the filled mask's 26-connected labelling for free.

    The filling already labels the components; a filled component keeps its label, and a component lying
    inside another one's cavity is merged into it. The result equals labelling the filled mask afresh
    (same numbers: a nested component's first voxel in raster order comes after its encloser's, so the
    order of the others is unchanged; tested), which saves :func:`~kitsseg.postprocess.pipeline.postprocess` a
    second labelling of the tumor mask's box (80 ms of the 0.3 s post-processing of the benchmark's 280
    k-voxel tumor mask)."""
    out = np.zeros(m.shape, dtype=bool)  # calloc: untouched pages outside the box cost nothing
    box = bounding_box(m, pad=1)
    if box is None:
        return out, _TumorLabels(m.shape, None)
    crop = m[box]
    filled = out[box]
    filled |= crop
    labels, n = _label(crop, 3)
    # ndimage.label numbers its components 1..n, so find_objects has a box (never None) for each
    objects: list[tuple[slice, ...]] = list(ndimage.find_objects(labels))
    merged = np.zeros(n + 1, dtype=bool)
    for index, sub in enumerate(objects, start=1):
        if sub is None or merged[index] or min(s.stop - s.start for s in sub) < 3:
            continue
        sub = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, size)) for s, size in zip(sub, crop.shape, strict=True)
        )
        region = labels[sub]
        part = region == index
        cavity = _enclosed(part) & ~part
        if cavity.any():
            filled[sub] |= cavity
            inside = np.unique(region[cavity])
            merged[inside[inside != 0]] = True
            region[cavity] = index  # a view: the labels gain the cavity and whatever lay inside it
    if merged.any():  # renumber without the merged labels, keeping the order
        renumber = np.cumsum(~merged) - 1
        renumber[merged] = 0
        labels = renumber.astype(labels.dtype)[labels]
        objects = [o for o, gone in zip(objects, merged[1:], strict=True) if not gone]
    return out, _TumorLabels(m.shape, box, labels, objects)


def _enclosed(part: np.ndarray) -> np.ndarray:
    """Voxels of the box that ``part`` covers or encloses: background not reaching the box's faces."""
    labels, n = ndimage.label(~part)  # 6-connectivity, as binary_fill_holes' default structure
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(labels.ndim):
        for end in (0, -1):
            outside[np.take(labels, end, axis=axis)] = True
    outside[0] = True  # label 0 is the component itself
    return part | ~outside[labels]
