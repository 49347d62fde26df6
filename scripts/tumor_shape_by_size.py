"""How the tumor shape model's bounds treat real tumors of each size (docs/model-card.md, post-processing).

    python scripts/tumor_shape_by_size.py [LABEL_DIR] [--bounds 1.07,2.8]

For every ground-truth tumor component (label 2, 26-connected, 10 voxels or more) of the label maps in
LABEL_DIR (default ``../shared/data/kits19-labels``): its sphere-equivalent diameter and its eigenvalue
ratio (voxel units, as the post-processing measures it). Prints, per size class, how many the bounds would
delete, below the lower and above the upper bound.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kitsseg.postprocess.shapestats import case_shapes, find_label_files
from kitsseg.postprocess.tumors import equivalent_diameter_mm

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "kits19-labels"
SIZES = (("<=20mm", 0.0, 20.0), ("20-40mm", 20.0, 40.0), (">40mm", 40.0, np.inf), ("all", 0.0, np.inf))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("labels", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--bounds", default="1.07,2.8")
    args = ap.parse_args()
    lo, hi = (float(v) for v in args.bounds.split(","))
    rows = []
    files = find_label_files(args.labels)
    for f in files:
        cs = case_shapes(f)
        for ratio, voxels in zip(cs.ratios, cs.voxels, strict=True):
            rows.append((equivalent_diameter_mm(voxels, cs.spacing), ratio))
    table = np.array(rows).reshape(-1, 2)
    print(f"{len(files)} label maps, {len(table)} tumor components; bounds [{lo:g}, {hi:g}] (voxel units)")
    for name, a, b in SIZES:
        sel = table[(table[:, 0] > a) & (table[:, 0] <= b)]
        below, above = int((sel[:, 1] < lo).sum()), int((sel[:, 1] > hi).sum())
        print(f"{name:8s} {len(sel):4d} tumors, deleted {below + above:3d} ({below} below, {above} above)")


if __name__ == "__main__":
    main()
