"""Measure a weights file on the held-out real slices, through the real inference path.

    python scripts/eval_starter.py src/kitsseg/assets/kitsseg-starter.pt [--json out.json] [--bf16]
        [--tumor-threshold P]

The slices and the patient-level split come from the training config (``configs/starter.json`` by
default: same sources, same grey-to-HU mapping, same seed), so the validation patients are exactly those
the recipe held out. Each validation slice is run through ``kitsseg.inference.predict.predict_volume`` as a
one-slice volume at its native resolution and pixel spacing: kidney model on the whole slice, tumor band
placed from the kidney prediction, probabilities brought back before thresholding.

Reported per source: pooled Dice (2*sum|A∩B| / (sum|A| + sum|B|)) for kidney+tumor (label > 0) and tumor
(label 2); the per-slice median tumor Dice over slices with tumor; kidney false-positive slices (slices
without kidney that get any kidney label); lesion-wise tumor detection in 2D (a ground-truth tumor region is
found when predicted tumor covers at least 10% of it; a predicted region touching no ground-truth tumor is a
false positive), by equivalent diameter (<= 20 mm, 20-40, > 40). Post-processing is measured with its 2D
analogues (hole filling, two largest kidney regions, tumor overlap with kidney+tumor); the eigenvalue-ratio
filter needs 3D components and is not measurable on single slices.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from kitsseg.inference.predict import predict_volume
from kitsseg.training.recipe import load_recipe
from kitsseg.training.slicesets import read_source, split_groups
from kitsseg.weights.checkpoint import load_bundle

ROOT = Path(__file__).resolve().parents[1]
SIZES = (("<=20mm", 0, 20), ("20-40mm", 20, 40), (">40mm", 40, math.inf))


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


def lesions_2d(pred, gt, pixel_mm2):
    """(found per size class, total per size class, false-positive regions) of one slice."""
    found, total = np.zeros(3), np.zeros(3)
    lab, n = ndimage.label(gt)
    for i in range(1, n + 1):
        comp = lab == i
        d = 2 * math.sqrt(comp.sum() * pixel_mm2 / math.pi)
        k = next(j for j, (_, lo, hi) in enumerate(SIZES) if lo < d <= hi or (j == 0 and d <= hi))
        total[k] += 1
        found[k] += (pred & comp).sum() >= 0.1 * comp.sum()
    plab, pn = ndimage.label(pred)
    fp = sum(1 for i in range(1, pn + 1) if not (gt & (plab == i)).any())
    return found, total, fp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", type=Path)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "starter.json")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--overlaps", default="0.2", help="tumor overlap thresholds to compare, e.g. 0.95,0.5")
    ap.add_argument(
        "--tumor-threshold", type=float, default=None, help="tumor threshold (default: the weights')"
    )
    args = ap.parse_args()
    recipe = load_recipe(args.config)
    parts = [p for s in recipe.sources for p in read_source(recipe.data_root, s)]
    groups = np.concatenate([p.group for p in parts])
    val = split_groups(groups, recipe.val_fraction, recipe.seed)
    bundle = load_bundle(args.weights)
    if args.tumor_threshold is not None and bundle.tumor is not None:
        bundle.tumor.threshold = args.tumor_threshold
    overlaps = [float(v) for v in args.overlaps.split(",")]
    acc: dict = {}
    det: dict = {}
    offset = 0
    for p in parts:
        for j in range(len(p.group)):
            if not val[offset + j]:
                continue
            hu, label, sp, src = p.hu[j][None], p.label[j], tuple(p.spacing[j]), str(p.source[j])
            pred = predict_volume(hu, bundle, bf16=args.bf16, spacing_rc=sp)
            gt_kt, gt_tu = label > 0, label == 2
            for name, (kt, tu) in variants(pred.kidney_tumor_mask[0], pred.tumor_mask[0], overlaps).items():
                for key in (src, "all"):
                    a = acc.setdefault(key, {}).setdefault(name, {"sums": np.zeros(6), "tumor_dice": []})
                    a["sums"] += [
                        (kt & gt_kt).sum(),
                        kt.sum(),
                        gt_kt.sum(),
                        (tu & gt_tu).sum(),
                        tu.sum(),
                        gt_tu.sum(),
                    ]
                    if gt_tu.any():
                        a["tumor_dice"].append(2 * (tu & gt_tu).sum() / (tu.sum() + gt_tu.sum()))
                    d = det.setdefault(key, {}).setdefault(
                        name,
                        {
                            "found": np.zeros(3),
                            "total": np.zeros(3),
                            "fp": 0,
                            "kidney_slices": 0,
                            "fp_kidney_slices": 0,
                            "neg_slices": 0,
                        },
                    )
                    f, t, fp = lesions_2d(tu, gt_tu, sp[0] * sp[1])
                    d["found"] += f
                    d["total"] += t
                    if gt_kt.any():
                        d["kidney_slices"] += 1
                        d["fp"] += fp
                    else:
                        d["neg_slices"] += 1
                        d["fp_kidney_slices"] += bool(kt.any())
        offset += len(p.group)
    res = {}
    for src, by in acc.items():
        res[src] = {}
        for name, a in by.items():
            s = a["sums"]
            d = det[src][name]
            res[src][name] = {
                "dice_kidney_tumor": round(float(2 * s[0] / max(s[1] + s[2], 1)), 4),
                "dice_tumor": round(float(2 * s[3] / max(s[4] + s[5], 1)), 4) if s[5] > 0 else None,
                "tumor_dice_median_per_slice": round(float(np.median(a["tumor_dice"])), 4)
                if a["tumor_dice"]
                else None,
                "lesions_found": {
                    SIZES[k][0]: f"{int(d['found'][k])}/{int(d['total'][k])}" for k in range(3)
                },
                "lesion_sensitivity": round(float(d["found"].sum() / max(d["total"].sum(), 1)), 4),
                "tumor_fp_per_kidney_slice": round(d["fp"] / max(d["kidney_slices"], 1), 4),
                "kidney_fp_slices": f"{d['fp_kidney_slices']}/{d['neg_slices']}",
            }
    print(
        f"{'source':16s} {'step':18s} {'k+t':>7s} {'tumor':>7s} {'med':>6s} {'sens':>6s} "
        "lesions<=20/20-40/>40  tumorFP/kslice  kidneyFP"
    )
    for src in sorted(res):
        for name, r in res[src].items():
            dt = "   n/a" if r["dice_tumor"] is None else f"{r['dice_tumor']:7.4f}"
            med = (
                "   n/a"
                if r["tumor_dice_median_per_slice"] is None
                else f"{r['tumor_dice_median_per_slice']:6.3f}"
            )
            les = " ".join(r["lesions_found"].values())
            print(
                f"{src:16s} {name:18s} {r['dice_kidney_tumor']:7.4f} {dt} {med} "
                f"{r['lesion_sensitivity']:6.3f} {les:22s} {r['tumor_fp_per_kidney_slice']:6.3f}  "
                f"{r['kidney_fp_slices']}"
            )
    if args.json:
        args.json.write_text(json.dumps({"weights": str(args.weights), "dice": res}, indent=2))


if __name__ == "__main__":
    main()
