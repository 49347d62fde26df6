"""Checks of a segmented CT against what the weights were trained on: a warning line, never silence.

A network answers on any input; these checks say when its answer deserves less trust, from the CT and the
result alone (no reference needed). Each returns a sentence for the report's ``input_checks`` and a
:class:`kitsseg.errors.KitssegWarning` the CLI prints as one line. Thresholds and why:

- **Kidneys not enhanced.** Enhanced renal parenchyma is 120-250 HU in arterial, nephrographic and
  excretory phases; unenhanced kidney is 30-40 HU. A median under 90 HU inside the kidney label means a
  non-contrast (or very early) scan: the weights saw such kidneys only as simulated ones.
- **Pixel spacing outside the training range.** Slices are resampled to the weights' model spacing, so a
  finer or coarser scan is handled geometrically, but accuracy outside the trained in-plane spacings
  (``trained_spacing_mm`` in the weights, 0.44-1.04 mm for the starter) is not measured.
- **Post-processing removed more than it kept.** The raw network output was mostly discarded as
  implausible: the kept part rests on a minority of what the network saw.
- **Implausible kidney volume.** An adult kidney is about 100-250 mL (with tumor, KiTS19 kidneys reach a
  few litres); under 40 mL on a side means a kidney found only in part, and no kidney on one side means a
  solitary kidney, a nephrectomy or a missed kidney.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

UNENHANCED_MEDIAN_HU = 90.0
SMALL_KIDNEY_ML = 40.0
LARGE_KIDNEY_ML = 3000.0


def input_checks(
    ct_hu_zrc: np.ndarray,
    labels_zrc: np.ndarray,
    raw_kidney_voxels: int,
    spacing_zrc: Sequence[float],
    kidney_volume_ml: Mapping[str, float | None],
    weights_metadata: Mapping[str, Any],
) -> list[str]:
    """Warnings (sentences) about this CT and its result; an empty list when nothing looks unusual."""
    out: list[str] = []
    kidney = labels_zrc == 1
    if kidney.any():
        median = float(np.median(np.asarray(ct_hu_zrc)[kidney]))
        if median < UNENHANCED_MEDIAN_HU:
            out.append(
                f"the kidneys look unenhanced (median {median:.0f} HU inside the kidney label; enhanced "
                "parenchyma is 120-250 HU): a non-contrast CT? The weights learned such kidneys only from "
                "simulated phases; check the mask"
            )
    lo, hi = weights_metadata.get("trained_spacing_mm", (None, None)) or (None, None)
    if lo is not None and hi is not None:
        rc = [float(s) for s in spacing_zrc[1:]]
        if min(rc) < float(lo) * 0.9 or max(rc) > float(hi) * 1.1:
            out.append(
                f"pixel spacing {rc[0]:.3g} x {rc[1]:.3g} mm is outside the training data's "
                f"{lo:.3g}-{hi:.3g} mm; slices are resampled to the model's spacing, but accuracy there "
                "is not measured"
            )
    kept = int(np.count_nonzero(labels_zrc))
    if raw_kidney_voxels > 0 and raw_kidney_voxels - kept > kept:
        out.append(
            f"post-processing removed more than it kept ({raw_kidney_voxels - kept} of {raw_kidney_voxels} "
            "voxels the network labelled): the result rests on a minority of the network's output"
        )
    volumes = {side: v for side, v in kidney_volume_ml.items() if v is not None}
    found = {side: v for side, v in volumes.items() if v > 0}
    if volumes and not found:
        out.append("no kidney was found")
    elif len(found) == 1 and len(volumes) == 2:
        side = next(iter(found))
        missing = "left" if side == "right" else "right"
        out.append(
            f"no {missing} kidney was found: a solitary kidney, a nephrectomy, or a kidney the model missed"
        )
    for side, v in found.items():
        if v < SMALL_KIDNEY_ML:
            out.append(
                f"the {side} kidney measures {v:.0f} mL, less than any adult kidney: found only in part?"
            )
        elif v > LARGE_KIDNEY_ML:
            out.append(f"the {side} kidney measures {v:.0f} mL, implausibly large: check the mask")
    return out
