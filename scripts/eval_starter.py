"""Measure a weights file on the held-out real slices, through the real inference path.

    python scripts/eval_starter.py src/kitsseg/assets/kitsseg-starter.pt [--json out.json] [--bf16]

Each validation slice (patient-level split of ``starter_data.split_groups``, the same seed as training)
is turned back into HU for the model window and run through ``kitsseg.predict.predict_volume`` as a
one-slice volume at full 512x512 resolution: kidney model on the whole slice, tumor band placed from the
kidney prediction, probabilities resized back before thresholding. Dice is pooled over all validation
slices of a source (2*sum|A∩B| / (sum|A| + sum|B|)), for kidney+tumor (label > 0) and tumor (label 2).
Post-processing is measured with its 2D analogues on slices (hole filling, two largest kidney regions,
tumor overlap with kidney+tumor); the eigenvalue-ratio filter needs 3D components and is not measurable
on single slices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from starter_data import WINDOW, load_all, split_groups  # noqa: E402

from kitsseg.checkpoint import load_bundle  # noqa: E402
from kitsseg.predict import predict_volume  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-slices"


def two_largest(mask):
    lab, n = ndimage.label(mask)
    if n <= 2:
        return mask
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    keep = np.argsort(sizes)[-2:] + 1
    return np.isin(lab, keep)


def overlap_filter(tumor, kt, min_overlap=0.95):
    lab, n = ndimage.label(tumor)
    out = np.zeros_like(tumor)
    for i in range(1, n + 1):
        comp = lab == i
        if (comp & kt).sum() / comp.sum() >= min_overlap:
            out |= comp
    return out


def variants(kt, tu, overlaps=(0.95,)):
    """Raw output and each post-processing step added in turn (2D analogues)."""
    out = {"raw": (kt, tu)}
    kt1, tu1 = ndimage.binary_fill_holes(kt), ndimage.binary_fill_holes(tu)
    out["+fill_holes"] = (kt1, tu1)
    kt2 = two_largest(kt1)
    out["+two_largest"] = (kt2, tu1)
    for ov in overlaps:
        out[f"+tumor_overlap{ov:g}"] = (kt2, overlap_filter(tu1, kt2, ov))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--overlaps", default="0.95", help="tumor overlap thresholds to compare, e.g. 0.95,0.5")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = load_all(DATA)
    val = split_groups(s.group, args.val_fraction, args.seed)
    bundle = load_bundle(args.weights)
    overlaps = [float(v) for v in args.overlaps.split(",")]
    acc: dict = {}
    idx = np.nonzero(val)[0]
    for i in idx:
        hu = (s.image[i] * (WINDOW[1] - WINDOW[0]) + WINDOW[0])[None]
        pred = predict_volume(hu, bundle, bf16=args.bf16)
        gt_kt, gt_tu = s.label[i] > 0, s.label[i] == 2
        for name, (kt, tu) in variants(pred.kidney_tumor_mask[0], pred.tumor_mask[0], overlaps).items():
            for src in (s.source[i], "all"):
                a = acc.setdefault(src, {}).setdefault(name, np.zeros(6))
                a += [(kt & gt_kt).sum(), kt.sum(), gt_kt.sum(), (tu & gt_tu).sum(), tu.sum(), gt_tu.sum()]
    res = {}
    for src, by in acc.items():
        res[src] = {}
        for name, a in by.items():
            d_kt = 2 * a[0] / max(a[1] + a[2], 1)
            d_tu = 2 * a[3] / max(a[4] + a[5], 1) if a[5] > 0 else float("nan")
            res[src][name] = {"dice_kidney_tumor": round(float(d_kt), 4), "dice_tumor": round(float(d_tu), 4)}
    n = {src: int(((s.source == src) & val).sum()) for src in np.unique(s.source)}
    n["all"] = int(val.sum())
    print(f"{'source':16s} {'n':>4s} {'step':16s} {'Dice k+t':>9s} {'Dice tumor':>10s}")
    for src in sorted(res):
        for name, r in res[src].items():
            print(f"{src:16s} {n[src]:4d} {name:16s} {r['dice_kidney_tumor']:9.4f} {r['dice_tumor']:10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"n_slices": n, "dice": res}, indent=2))


if __name__ == "__main__":
    main()
