"""Load the real CT slices in ../shared/data/real-slices into one model frame (HU window 0..255).

Why this mapping (documented in docs/model-card.md):
- KiTS19 and CURVAS slices are stored as clip(HU, 0, 255): identical to the model window, no change.
- KiTS23 "one slice per case" was display-windowed to about [-110, 330] HU (fat near grey 5, soft tissue
  ~35-45 HU near grey 84): HU = grey * 440 / 255 - 110, then clipped to the window.
- KiTS23 "mid slice" images are min-max scaled per slice from an unknown window; their pooled histogram
  puts the fat mode at grey 5 and the soft-tissue mode at grey 83, the same landmarks as the set above, so
  the same mapping is used, and intensity augmentation covers the per-slice residual.
- Labels: 1 kidney, 2 tumor, 3 cyst (counted as kidney, KiTS19 convention); CURVAS label 2 is kidney.
- Patients: KiTS19 case N and KiTS23 case N are the same patient (KiTS23 extends KiTS19); CURVAS slices are
  grouped by their CT id. The validation split is drawn over these patient groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WINDOW = (0.0, 255.0)


@dataclass
class SliceSet:
    image: np.ndarray  # (N, 512, 512) float32 in [0, 1] (HU window 0..255)
    label: np.ndarray  # (N, 512, 512) uint8: 0 background, 1 kidney, 2 tumor
    group: np.ndarray  # (N,) patient group strings
    source: np.ndarray  # (N,) source names


def _kits23_to_unit(grey: np.ndarray) -> np.ndarray:
    hu = grey.astype(np.float32) * (440.0 / 255.0) - 110.0
    return np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0.0, 1.0)


def load_all(root: Path) -> SliceSet:
    images, labels, groups, sources = [], [], [], []

    def add(img, lab, grp, src):
        images.append(img.astype(np.float32))
        labels.append(lab)
        groups.extend(grp)
        sources.extend([src] * len(grp))

    for fname, src in [
        ("kits23_one_slice_per_case.npz", "kits23_slice50"),
        ("kits23_mid_slice_per_case.npz", "kits23_mid"),
    ]:
        d = np.load(root / fname)
        lab = d["label"].copy()
        lab[lab == 3] = 1
        add(_kits23_to_unit(d["image_u8"]), lab, [f"kits_{c}" for c in d["case_id"]], src)
    d = np.load(root / "kits19_slices_512.npz")
    add(d["image_u8"] / 255.0, d["label"], [f"kits_{c}" for c in d["case_id"]], "kits19")
    c = np.load(root / "curvas" / "curvas_mini_test_3annotators.npz")
    for a in ("a1", "a2", "a3"):
        lab = np.where(c[f"{a}_label"] == 2, 1, 0).astype(np.uint8)
        add(c[f"{a}_image_u8"] / 255.0, lab, [f"curvas_{n.split('_')[0]}" for n in c[f"{a}_name"]], "curvas")
    return SliceSet(np.concatenate(images), np.concatenate(labels), np.array(groups), np.array(sources))


def split_groups(groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation slices: whole patient groups, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    # Stratify by data family so the small CURVAS set is not over- or under-drawn by chance.
    for family in sorted({g.split("_")[0] for g in groups.tolist()}):
        uniq = np.array(sorted({g for g in groups.tolist() if g.startswith(family + "_")}))
        n_val = max(1, int(round(len(uniq) * val_fraction)))
        val_groups |= set(rng.choice(uniq, size=n_val, replace=False).tolist())
    return np.array([g in val_groups for g in groups])
