"""Lesion-wise tumor detection: components, the found / false-positive rule, sizes, and through evaluate.

The scenes are spheres of known radius (mm) at a non-isotropic spacing, so the sizes are known without
reading the code under test: a sphere of radius r has an equivalent diameter close to 2 r.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsseg.cli import main
from kitsseg.errors import EXIT_BATCH_FAILED, GridMismatchError, InvalidOptionError
from kitsseg.evaluation.evaluate import COLUMNS, evaluate
from kitsseg.evaluation.lesions import (
    DEFAULT_MIN_OVERLAP,
    SIZE_CLASSES,
    equivalent_diameter_mm,
    label_tumors,
    lesion_rule,
    match_lesions,
    size_class,
    summarize_lesions,
)

SPACING = (2.5, 0.8, 0.8)  # (z, row, col) mm, like a 2.5 mm-slice abdominal CT
SHAPE = (40, 160, 160)  # 100 x 128 x 128 mm
SIZE_KEYS = [key for key, _, _ in SIZE_CLASSES]


# ------------------------------------------------------------------------------------------------ scenes


def ball(center_mm, radius_mm, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Voxels whose centre (index x spacing, mm) lies within ``radius_mm`` of ``center_mm``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g * s) - c) ** 2 for g, s, c in zip(grids, spacing, center_mm, strict=True))
    return d2 <= radius_mm**2


def first_voxels(mask: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` voxels of ``mask`` in scan order (a cap of the tumor, as a partial prediction)."""
    out = np.zeros_like(mask)
    out.flat[np.flatnonzero(mask)[:k]] = True
    return out


#: Ground-truth tumors of the main scene: name -> (centre mm, radius mm).
GT_TUMORS = {
    "large_found": ((50, 32, 32), 24.0),  # d ~ 48 mm -> >40mm, fully predicted
    "medium_missed": ((50, 32, 96), 14.0),  # d ~ 28 mm -> 20-40mm, predicted as kidney (label 1)
    "small_found": ((50, 96, 32), 6.0),  # d ~ 12 mm -> <=20mm, fully predicted
    "small_below": ((30, 100, 100), 7.0),  # covered 9 %: missed, but its partial prediction is no FP
    "small_above": ((70, 100, 100), 7.0),  # covered 11 %: found
}
#: Predicted tumors touching no ground-truth tumor: name -> (centre mm, radius mm).
FP_TUMORS = {
    "fp_small": ((50, 115, 60), 4.0),  # d ~ 8 mm -> <=20mm
    "fp_medium": ((50, 70, 70), 12.0),  # d ~ 24 mm -> 20-40mm
}


def scene() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(gt, pred, masks)``: label maps of the main scene and each named tumor's mask."""
    masks = {name: ball(c, r) for name, (c, r) in {**GT_TUMORS, **FP_TUMORS}.items()}
    gt = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    for name in GT_TUMORS:
        gt[masks[name]] = 2
    pred[masks["large_found"]] = 2
    pred[masks["small_found"]] = 2
    pred[masks["medium_missed"]] = 1  # called kidney: not a tumor voxel
    below, above = masks["small_below"], masks["small_above"]
    pred[first_voxels(below, int(0.09 * below.sum()))] = 2
    pred[first_voxels(above, math.ceil(0.11 * above.sum()))] = 2
    for name in FP_TUMORS:
        pred[masks[name]] = 2
    return gt, pred, masks


# ------------------------------------------------------------------------------------------------ pieces


def test_equivalent_diameter_is_the_sphere_of_equal_volume():
    # 1000 voxels of 1 mm^3: a sphere of 1000 mm^3 has d = (6000 / pi)^(1/3) = 12.407 mm
    assert equivalent_diameter_mm(1000, (1.0, 1.0, 1.0)) == pytest.approx(12.4070098, rel=1e-7)
    # the voxel volume comes from all three spacings: 8 times the volume doubles the diameter
    assert equivalent_diameter_mm(1000, (2.0, 2.0, 2.0)) == pytest.approx(2 * 12.4070098, rel=1e-7)
    assert equivalent_diameter_mm(1000, (2.5, 0.8, 0.5)) == pytest.approx(12.4070098, rel=1e-7)
    for radius in (6.0, 14.0, 24.0):  # a voxelised sphere at 2.5 x 0.8 x 0.8 mm is close to 2 r
        n = int(ball((50, 64, 64), radius).sum())
        assert equivalent_diameter_mm(n, SPACING) == pytest.approx(2 * radius, rel=0.05)


def test_size_classes_and_their_bounds():
    assert SIZE_KEYS == ["<=20mm", "20-40mm", ">40mm"]
    assert size_class(0.5) == "<=20mm"
    assert size_class(20.0) == "<=20mm"
    assert size_class(20.000001) == "20-40mm"
    assert size_class(40.0) == "20-40mm"
    assert size_class(40.000001) == ">40mm"
    assert size_class(300.0) == ">40mm"
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="diameter"):
            size_class(bad)


def test_components_are_26_connected():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner to corner: one tumor
    assert label_tumors(mask)[1] == 1
    mask[4, 4, 4] = True  # one voxel apart: a second tumor
    assert label_tumors(mask)[1] == 2


def test_the_main_scene_counts_and_sizes():
    gt, pred, masks = scene()
    m = match_lesions(pred, gt, SPACING)
    assert m.min_overlap == DEFAULT_MIN_OVERLAP == 0.1
    assert m.n_gt == 5
    assert m.n_found == 3  # large, small, small_above
    assert m.n_false_positive == 2  # fp_small, fp_medium; the 9 % cap touches its tumor, so it is no FP
    assert len(m.pred) == 6  # large, small, two caps, two FPs
    by_voxels = {t.voxels: t for t in m.gt}
    expected = {
        "large_found": (True, ">40mm"),
        "medium_missed": (False, "20-40mm"),
        "small_found": (True, "<=20mm"),
        "small_below": (False, "<=20mm"),
        "small_above": (True, "<=20mm"),
    }
    # the two 7 mm tumors have equal voxel counts, so compare them by coverage below
    assert int(masks["small_below"].sum()) == int(masks["small_above"].sum())
    for name, (found, cls) in expected.items():
        t = by_voxels[int(masks[name].sum())]
        assert t.size_class == cls, name
        assert t.diameter_mm == pytest.approx(2 * GT_TUMORS[name][1], rel=0.05), name
        if not name.startswith("small_"):
            assert t.found is found, name
    caps = sorted((t for t in m.gt if t.voxels == int(masks["small_below"].sum())), key=lambda t: t.found)
    assert [t.found for t in caps] == [False, True]
    assert 0.085 < caps[0].covered_fraction < 0.1 <= 0.11 <= caps[1].covered_fraction < 0.12
    fps = sorted(p.diameter_mm for p in m.pred if p.false_positive)
    assert fps == pytest.approx([8.0, 24.0], rel=0.1)
    assert m.counts() == {
        "<=20mm": {"gt": 3, "found": 2, "false_positive": 1},
        "20-40mm": {"gt": 1, "found": 0, "false_positive": 1},
        ">40mm": {"gt": 1, "found": 1, "false_positive": 0},
    }


def test_the_threshold_is_inclusive_and_exact():
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[1, 0:3, 0:10] = 2  # 30 voxels; 0.1 * 30 is 3.0000000000000004 in floating point
    pred = np.zeros_like(gt)
    pred[1, 0, 0:3] = 2  # exactly 3 of 30 = 10 %
    (t,) = match_lesions(pred, gt, (1, 1, 1)).gt
    assert t.covered_voxels == 3
    assert t.found
    pred[1, 0, 2] = 0  # 2 of 30
    assert not match_lesions(pred, gt, (1, 1, 1)).gt[0].found
    assert match_lesions(pred, gt, (1, 1, 1), min_overlap=0.05).gt[0].found  # 6.7 % >= 5 %
    pred[1, 0:3, 0:10] = 2  # all of it
    assert match_lesions(pred, gt, (1, 1, 1), min_overlap=1.0).n_found == 1


def test_coverage_counts_every_predicted_component_together():
    gt = np.zeros((6, 12, 12), np.uint8)
    gt[1:5, 1:11, 1:11] = 2  # 400 voxels
    pred = np.zeros_like(gt)
    pred[1, 1:3, 1:11] = 2  # 20 voxels: 5 %
    pred[4, 1:3, 1:11] = 2  # another 20, a separate component: together 10 %
    m = match_lesions(pred, gt, (1, 1, 1))
    assert len(m.pred) == 2
    assert m.n_found == 1
    assert m.n_false_positive == 0


def test_a_prediction_grazing_a_tumor_is_no_false_positive_but_finds_nothing():
    gt = np.zeros((6, 12, 12), np.uint8)
    gt[1:5, 1:6, 1:6] = 2  # 100 voxels
    pred = np.zeros_like(gt)
    pred[1:5, 5:11, 5:11] = 2  # 144 voxels, 4 of them on the tumor (its column 5, row 5)
    m = match_lesions(pred, gt, (1, 1, 1))
    (p,) = m.pred
    assert p.voxels == 144
    assert not p.false_positive  # 4 / 144 = 3 % of it overlaps: any touch is enough
    assert m.gt[0].covered_voxels == 4
    assert m.n_found == 0  # 4 % of the tumor covered: below 10 %
    pred[1:5, 5, 5] = 0  # now it touches no tumor voxel (diagonal neighbours do not count as overlap)
    assert match_lesions(pred, gt, (1, 1, 1)).n_false_positive == 1


def test_specks_are_counted_not_dropped():
    gt = np.zeros((5, 5, 5), np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0, 0] = 2  # a one-voxel ground-truth tumor, missed
    pred[4, 4, 4] = 2  # a one-voxel predicted tumor, a false positive
    m = match_lesions(pred, gt, (1, 1, 1))
    assert (m.n_gt, m.n_found, m.n_false_positive) == (1, 0, 1)


def test_no_tumors_and_bad_input():
    empty = np.zeros((3, 4, 5), np.uint8)
    m = match_lesions(empty, empty, (1, 1, 1))
    assert (m.n_gt, m.n_found, m.n_false_positive) == (0, 0, 0)
    with pytest.raises(GridMismatchError, match="shape"):
        match_lesions(empty[:2], empty, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        match_lesions(empty, empty, (1, 0, 1))
    for bad in (0, 0.0, -0.1, 1.01, math.nan, "x"):
        with pytest.raises(InvalidOptionError, match="lesion overlap"):
            match_lesions(empty, empty, (1, 1, 1), min_overlap=bad)


def test_summary_pools_over_cases():
    gt, pred, _ = scene()
    m1 = match_lesions(pred, gt, SPACING)
    empty = np.zeros((3, 4, 5), np.uint8)
    m2 = match_lesions(empty, empty, (1, 1, 1))
    s = summarize_lesions([m1, m2])
    assert s["rule"] == lesion_rule(0.1)
    assert "touches no ground-truth tumor voxel" in s["rule"]
    assert s["n_cases"] == 2
    assert s["overall"] == {
        "tumors_gt": 5,
        "tumors_found": 3,
        "sensitivity": 0.6,
        "false_positives": 2,
        "false_positives_per_case": 1.0,
    }
    assert s["by_size"]["20-40mm"]["sensitivity"] == 0.0
    assert s["by_size"]["<=20mm"]["sensitivity"] == pytest.approx(2 / 3)
    assert s["by_size"][">40mm"]["false_positives_per_case"] == 0.0
    none = summarize_lesions([m2])
    assert none["overall"]["sensitivity"] is None  # no ground-truth tumor: undefined, not 0 or 1
    assert summarize_lesions([])["overall"]["false_positives_per_case"] is None


# ------------------------------------------------------------------------------------------------ files


def save_kits(path: Path, labels: np.ndarray, spacing=SPACING) -> Path:
    """Labels in the KiTS19 stored layout: array (z, row, col), axis codes ('I', 'P', 'L')."""
    st, pr, pc = spacing
    affine = np.array([[0, 0, -pc, 0], [0, -pr, 0, 0], [-st, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)
    return path


@pytest.fixture
def lesion_dataset(tmp_path):
    """case 0: the main scene; case 1: no tumor, one FP; case 2: no tumor anywhere; case 3: other grid."""
    gt0, pred0, _ = scene()
    none = np.zeros(SHAPE, np.uint8)
    pred1 = none.copy()
    pred1[ball((50, 64, 64), 4.0)] = 2
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for i, (g, p) in enumerate([(gt0, pred0), (none, pred1), (none, none), (gt0, pred0[:-1])]):
        save_kits(gt_dir / f"case_{i:05d}" / "segmentation.nii.gz", g)
        save_kits(pred_dir / f"case_{i:05d}.nii.gz", p)
    return pred_dir, gt_dir


def test_evaluate_writes_lesion_columns_and_summary(lesion_dataset, tmp_path):
    pred_dir, gt_dir = lesion_dataset
    res = evaluate(pred_dir, gt_dir, out_dir=tmp_path / "out")
    assert [r["status"] for r in res.rows] == ["ok", "ok", "ok", "error"]
    counts = [(r["tumors_gt"], r["tumors_found"], r["tumors_false_positive"]) for r in res.rows[:3]]
    assert counts == [(5, 3, 2), (0, 0, 1), (0, 0, 0)]
    assert res.rows[0]["lesions"].counts()["20-40mm"] == {"gt": 1, "found": 0, "false_positive": 1}
    assert res.rows[3]["lesions"] is None

    with (tmp_path / "out" / "per_case.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        rows = list(reader)
    assert header == list(COLUMNS)
    assert header[header.index("tumors_gt") :][:3] == ["tumors_gt", "tumors_found", "tumors_false_positive"]
    assert [(r["tumors_gt"], r["tumors_found"], r["tumors_false_positive"]) for r in rows] == [
        ("5", "3", "2"),
        ("0", "0", "1"),
        ("0", "0", "0"),
        ("", "", ""),  # error row: no counts
    ]

    lesions = json.loads((tmp_path / "out" / "summary.json").read_text())["lesions"]
    assert lesions["rule"] == lesion_rule(0.1)
    assert lesions["min_overlap"] == 0.1
    assert lesions["connectivity"] == 26
    assert lesions["size_classes_mm"] == {
        "<=20mm": [0.0, 20.0],
        "20-40mm": [20.0, 40.0],
        ">40mm": [40.0, None],
    }
    assert lesions["n_cases"] == 3  # the error row is not a case with zero tumors
    assert lesions["overall"] == {
        "tumors_gt": 5,
        "tumors_found": 3,
        "sensitivity": 0.6,
        "false_positives": 3,
        "false_positives_per_case": 1.0,
    }
    by = lesions["by_size"]
    assert list(by) == SIZE_KEYS
    assert by["<=20mm"] == {
        "tumors_gt": 3,
        "tumors_found": 2,
        "sensitivity": pytest.approx(2 / 3),
        "false_positives": 2,  # case 0's 8 mm FP and case 1's 8 mm FP
        "false_positives_per_case": pytest.approx(2 / 3),
    }
    assert by["20-40mm"] == {
        "tumors_gt": 1,
        "tumors_found": 0,
        "sensitivity": 0.0,
        "false_positives": 1,
        "false_positives_per_case": pytest.approx(1 / 3),
    }
    assert by[">40mm"] == {
        "tumors_gt": 1,
        "tumors_found": 1,
        "sensitivity": 1.0,
        "false_positives": 0,
        "false_positives_per_case": 0.0,
    }


def test_evaluate_lesion_overlap_option(lesion_dataset):
    pred_dir, gt_dir = lesion_dataset
    res = evaluate(pred_dir / "case_00000.nii.gz", gt_dir, lesion_overlap=0.08)
    assert res.rows[0]["tumors_found"] == 4  # the 9 % cap is now enough
    assert res.summary["lesions"]["min_overlap"] == 0.08
    assert "at least 0.08" in res.summary["lesions"]["rule"]
    with pytest.raises(InvalidOptionError, match="lesion overlap"):
        evaluate(pred_dir, gt_dir, lesion_overlap=0.0)


def test_cli_lesion_overlap_columns_and_table(lesion_dataset, tmp_path, capsys):
    pred_dir, gt_dir = lesion_dataset
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exc:  # case 3 is on another grid: exit 2, outputs still written
        main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(out), "--lesion-overlap", "0.08"])
    assert exc.value.code == EXIT_BATCH_FAILED
    text = capsys.readouterr().out
    assert "Tumor detection over 3 evaluated cases" in text
    assert "20-40mm" in text
    assert "cover >= 0.08 of a ground-truth tumor" in " ".join(text.split())  # the line may wrap
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lesions"]["min_overlap"] == 0.08
    assert summary["lesions"]["overall"]["tumors_found"] == 4
    assert summary["lesions"]["overall"]["sensitivity"] == 0.8
    with (out / "per_case.csv").open(newline="") as fh:
        first = next(csv.DictReader(fh))
    assert (first["tumors_gt"], first["tumors_found"], first["tumors_false_positive"]) == ("5", "4", "2")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_cli_refuses_a_bad_lesion_overlap(lesion_dataset, tmp_path, capsys, value):
    pred_dir, gt_dir = lesion_dataset
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(tmp_path / "x"), "--lesion-overlap", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lesion" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
