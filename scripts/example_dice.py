"""Kidney Dice of a kitsseg mask of the shipped example CT against TotalSegmentator's kidney labels.

The reference is itself a model's output (TotalSegmentator v1: 2 = kidney right, 3 = kidney left), not a
hand-drawn label, and the CT is non-contrast: a sanity check of 3D behaviour, not an accuracy claim.

    python scripts/example_dice.py MASK.nii.gz
"""

import sys
from pathlib import Path

import numpy as np

from kitsseg.io.load import load_labels

REF = Path(__file__).resolve().parents[2] / "shared/data/real-ct/example_ct_seg_v1_blob18e85b3.nii.gz"

pred = load_labels(sys.argv[1]).data
ref = load_labels(REF).data
n_cols = ref.shape[2]
for name, r, half in (
    ("right", ref == 2, slice(0, n_cols // 2)),
    ("left", ref == 3, slice(n_cols // 2, None)),
):
    p = np.zeros_like(r)
    p[:, :, half] = pred[:, :, half] > 0
    dice = 2 * (p & r).sum() / (p.sum() + r.sum())
    print(f"{name:5s} kidney Dice {dice:.4f}  ref {r.sum()} pred {p.sum()} voxels")
both = (ref == 2) | (ref == 3)
print(f"both  kidneys Dice {2 * ((pred > 0) & both).sum() / ((pred > 0).sum() + both.sum()):.4f}")
