"""Array helpers that every layer uses: a leaf module (numpy only).

:func:`bounding_box` crops the work of loaders, writers, post-processing, metrics and reports to the few
percent of a CT that a mask occupies.
"""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every nonzero voxel, grown by ``pad`` and clipped to the array.

    ``None`` for an empty mask. Cheaper than ``np.argwhere`` on a full CT: the first axis (slices) is
    found from one contiguous pass, and the other axes only from the slices in that range, collapsed
    to one plane first (a kidney mask spans a third of a CT's slices; a full-volume ``any`` over a
    non-contiguous axis pair costs several times a contiguous pass).
    """
    arr = np.asarray(mask)
    if arr.ndim == 0 or arr.size == 0:
        return None
    first = np.flatnonzero(arr.reshape(arr.shape[0], -1).any(axis=1))
    if first.size == 0:
        return None
    lo, hi = int(first[0]), int(first[-1]) + 1
    plane = arr[lo:hi].any(axis=0) if arr.ndim > 1 else None
    slices = [slice(max(lo - pad, 0), min(hi + pad, arr.shape[0]))]
    for axis in range(1, arr.ndim):
        assert plane is not None  # arr.ndim > 1 in this loop
        others = tuple(a for a in range(plane.ndim) if a != axis - 1)
        hit = np.flatnonzero(np.any(plane, axis=others) if others else plane)
        slices.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, arr.shape[axis])))
    return tuple(slices)
