"""Whole-volume kidney Dice per side on the real CTs in ../shared (not training data), through `segment`.

    python scripts/validate_real_ct.py [--weights FILE] [--json out.json]

- ``ircad_01``: a contrast-enhanced CT from another institution (3D-IRCADb-01 patient 1), reference
  ``kidney_sides.nii.gz`` (1 right, 2 left, hand-drawn by the source); validation only, never training.
- ``example``: the shipped non-contrast example CT, reference TotalSegmentator's kidney labels (2 right,
  3 left), itself a model's output.

Dice of label > 0 in kitsseg's mask against each side's reference, the prediction split at the midline
between the two reference kidneys' centroids (columns of the internal frame run patient right to left).
Neither CT has a tumor, so the tumor volume kitsseg writes on each is reported as its false tumor (mL).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from kitsseg.inference.segment import load_model, segment
from kitsseg.io.load import load_labels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"
CASES = {
    "ircad_01": (SHARED / "ircad_01" / "ct.nii.gz", SHARED / "ircad_01" / "kidney_sides.nii.gz", (1, 2)),
    "example": (SHARED / "example_ct.nii.gz", SHARED / "example_ct_seg_v1_blob18e85b3.nii.gz", (2, 3)),
}


def side_dice(pred: np.ndarray, ref: np.ndarray, codes: tuple[int, int]) -> dict[str, float]:
    right, left = ref == codes[0], ref == codes[1]
    cr = np.argwhere(right)[:, 2].mean()
    cl = np.argwhere(left)[:, 2].mean()
    mid = int(round((cr + cl) / 2))
    p = pred > 0
    pr, pl = p.copy(), p.copy()
    pr[:, :, mid:] = False
    pl[:, :, :mid] = False
    out = {}
    for name, a, b in (("right", pr, right), ("left", pl, left), ("both", p, right | left)):
        out[name] = round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = load_model(args.weights) if args.weights else load_model()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ct, ref_path, codes) in CASES.items():
            if not ct.exists():
                print(f"{name}: {ct} absent, skipped")
                continue
            out = Path(tmp) / f"{name}.nii.gz"
            res = segment(ct, out, weights=model)
            labels = load_labels(out)
            pred = labels.data
            ref = load_labels(ref_path).data
            # Neither CT has a tumor in its reference: every tumor voxel kitsseg writes is a false one.
            false_tumor_ml = float((pred == 2).sum() * np.prod(labels.spacing) / 1000.0)
            results[name] = {
                "dice": side_dice(pred, ref, codes),
                "false_tumor_ml": round(false_tumor_ml, 2),
                "warnings": list(res.report.get("warnings", [])),
            }
            print(
                f"{name:9s} kidney Dice right {results[name]['dice']['right']:.4f} "
                f"left {results[name]['dice']['left']:.4f} both {results[name]['dice']['both']:.4f}  "
                f"false tumor {false_tumor_ml:.1f} mL"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
