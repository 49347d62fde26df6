"""Metrics against hand-computed values, a brute-force surface distance, and the empty-mask rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from kitsseg.errors import GridMismatchError
from kitsseg.evaluation.metrics import (
    EMPTY_MASK_RULE,
    METRIC_NAMES,
    case_metrics,
    dice,
    hd95,
    region_mask,
    summarize,
    surface,
    surface_dice,
    surface_distances,
    surface_metrics,
    volume_ml,
)

SPACING = (3.0, 0.8, 0.7)


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one of the 6 face neighbours outside the mask (or outside the array)."""
    padded = np.pad(mask, 1, constant_values=False)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_in = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = np.roll(padded, step, axis=axis)[core]
            all_in &= shifted
    return mask & ~all_in


def _brute_distances(pred, gt, spacing):
    sp = np.asarray(spacing)
    a = np.argwhere(_brute_surface(pred)) * sp
    b = np.argwhere(_brute_surface(gt)) * sp
    d = cdist(a, b)
    return d.min(axis=1), d.min(axis=0)


def _box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


# ------------------------------------------------------------------------------------------------ Dice


def test_dice_by_hand():
    pred = np.zeros((2, 3, 3), dtype=bool)
    gt = np.zeros((2, 3, 3), dtype=bool)
    pred[0, 0, :] = True  # 3 voxels
    pred[1, 0, 0] = True  # 4 in all
    gt[0, 0, :2] = True  # 2 overlap
    gt[1, 0, 0] = True  # 3 overlap
    gt[1, 2, :] = True  # 6 in all
    assert dice(pred, gt) == pytest.approx(2 * 3 / (4 + 6))


def test_dice_kits_regions_by_hand():
    # One row of 8 voxels: pred and gt labels side by side.
    pred = np.array([[[0, 1, 1, 2, 2, 2, 1, 0]]], dtype=np.uint8)
    gt = np.array([[[0, 1, 2, 2, 2, 0, 0, 1]]], dtype=np.uint8)
    m = case_metrics(pred, gt, (1.0, 1.0, 1.0))
    # kidney+tumor (label>0): pred idx 1-6 (6), gt idx 1-4,7 (5), overlap 1-4 (4)
    assert m["dice_kidney_tumor"] == pytest.approx(2 * 4 / 11)
    # tumor: pred 3,4,5 (3), gt 2,3,4 (3), overlap 3,4 (2)
    assert m["dice_tumor"] == pytest.approx(4 / 6)
    # kidney only: pred 1,2,6 (3), gt 1,7 (2), overlap 1 (1)
    assert m["dice_kidney"] == pytest.approx(2 / 5)


def test_region_masks():
    labels = np.array([0, 1, 2, 3])
    assert region_mask(labels, "kidney_tumor").tolist() == [False, True, True, True]
    assert region_mask(labels, "tumor").tolist() == [False, False, True, False]
    assert region_mask(labels, "kidney").tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="unknown region"):
        region_mask(labels, "liver")


def test_dice_empty_rule():
    empty = np.zeros((3, 4, 5), dtype=bool)
    some = empty.copy()
    some[1, 1, 1] = True
    assert math.isnan(dice(empty, empty))
    assert dice(some, empty) == 0.0
    assert dice(empty, some) == 0.0
    assert dice(some, some) == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(GridMismatchError, match="differs"):
        dice(np.zeros((2, 3, 4), bool), np.zeros((2, 4, 3), bool))
    with pytest.raises(GridMismatchError):
        case_metrics(np.zeros((2, 3, 4), np.uint8), np.zeros((3, 3, 4), np.uint8), SPACING)


def test_perturbed_mask_dice_decreases_monotonically():
    gt = _box((20, 30, 30), (5, 5, 5), (15, 25, 25))
    values = []
    for shift in range(0, 6):
        pred = np.roll(gt, shift, axis=2)
        values.append(dice(pred, gt))
    assert values[0] == 1.0
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    # shift by s along a 20-voxel side: overlap (20 - s) / 20
    assert values[3] == pytest.approx(17 / 20)


# ------------------------------------------------------------------------------------------------ volumes


def test_volume_ml():
    m = np.zeros((4, 5, 6), dtype=bool)
    m[0, 0, :5] = True
    m[3, 4, 5] = True
    assert volume_ml(m, (2.0, 0.5, 0.5)) == pytest.approx(6 * 0.5 / 1000)
    with pytest.raises(ValueError, match="spacing"):
        volume_ml(m, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        volume_ml(m, (1.0, 0.0, 1.0))


def test_case_metrics_volumes_and_keys():
    gt = np.zeros((4, 6, 6), dtype=np.uint8)
    gt[1:3, 1:5, 1:5] = 1  # 32 voxels
    gt[1:3, 2:4, 2:4] = 2  # 8 of them tumor
    pred = gt.copy()
    pred[pred == 2] = 1  # tumor missed, composite identical
    m = case_metrics(pred, gt, (2.0, 1.0, 1.0))
    assert tuple(m) == METRIC_NAMES
    voxel_ml = 2.0 / 1000
    assert m["vol_pred_kt_ml"] == pytest.approx(32 * voxel_ml)
    assert m["vol_gt_kt_ml"] == pytest.approx(32 * voxel_ml)
    assert m["vol_diff_kt_ml"] == pytest.approx(0.0)
    assert m["vol_pred_tumor_ml"] == 0.0
    assert m["vol_diff_tumor_ml"] == pytest.approx(-8 * voxel_ml)
    assert m["vol_diff_kidney_ml"] == pytest.approx(8 * voxel_ml)
    assert m["dice_kidney_tumor"] == 1.0
    assert m["dice_tumor"] == 0.0  # one empty -> 0
    assert math.isnan(m["hd95_tumor_mm"])  # one empty -> undefined
    assert m["surface_dice_tumor"] == 0.0
    assert m["hd95_kidney_tumor_mm"] == 0.0
    assert m["surface_dice_kidney_tumor"] == 1.0


def test_case_metrics_both_empty_is_nan():
    z = np.zeros((3, 4, 4), dtype=np.uint8)
    m = case_metrics(z, z, SPACING)
    for k in ("dice_kidney_tumor", "dice_tumor", "dice_kidney", "hd95_tumor_mm", "surface_dice_tumor"):
        assert math.isnan(m[k]), k
    assert m["vol_gt_kt_ml"] == 0.0


# ------------------------------------------------------------------------------------------------ surfaces


def test_surface_of_box_is_its_shell():
    m = _box((7, 7, 7), (1, 1, 1), (6, 6, 6))  # 5^3 box
    s = surface(m)
    assert s.sum() == 5**3 - 3**3
    assert not s[3, 3, 3]
    # a mask touching the array edge: the edge voxels count as surface
    full = np.ones((3, 3, 3), dtype=bool)
    assert surface(full).sum() == 27 - 1


def test_hd95_two_points_by_hand():
    a = np.zeros((4, 4, 6), dtype=bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[1, 0, 4] = True
    spacing = (3.0, 1.0, 1.0)
    expected = math.hypot(3.0, 4.0)  # 5 mm
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert surface_dice(a, b, spacing, tolerance_mm=4.9) == 0.0
    assert surface_dice(a, b, spacing, tolerance_mm=5.0) == 1.0


def test_identical_masks():
    m = _box((10, 12, 12), (2, 3, 3), (8, 9, 10))
    assert surface_metrics(m, m, SPACING) == (0.0, 1.0)


def test_surface_empty_rule():
    empty = np.zeros((5, 5, 5), dtype=bool)
    some = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    h, s = surface_metrics(empty, empty, SPACING)
    assert math.isnan(h)
    assert math.isnan(s)
    for p, g in ((some, empty), (empty, some)):
        h, s = surface_metrics(p, g, SPACING)
        assert math.isnan(h)
        assert s == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(some, empty, SPACING)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 14, 13)
    gt = _box(shape, (2, 3, 2), (7, 11, 10))
    pred = np.roll(gt, (1, -2, 1), axis=(0, 1, 2))
    pred ^= rng.random(shape) < 0.08  # ragged, with holes and specks, touching edges sometimes
    gt[0, 0, 0] = True  # an isolated voxel in a corner
    spacing = (2.5, 0.7, 0.9)
    got_p, got_g = surface_distances(pred, gt, spacing)
    exp_p, exp_g = _brute_distances(pred, gt, spacing)
    # distance arrays come out in C order of the surface voxels on both sides
    np.testing.assert_allclose(got_p, exp_p, atol=1e-9)
    np.testing.assert_allclose(got_g, exp_g, atol=1e-9)
    h, sd = surface_metrics(pred, gt, spacing, tolerance_mm=1.5)
    assert h == pytest.approx(max(np.percentile(exp_p, 95), np.percentile(exp_g, 95)))
    within = (exp_p <= 1.5).sum() + (exp_g <= 1.5).sum()
    assert sd == pytest.approx(within / (exp_p.size + exp_g.size))


def test_crop_does_not_change_surface_metrics():
    small_gt = _box((8, 10, 10), (1, 2, 2), (6, 8, 7))
    small_pred = np.roll(small_gt, 2, axis=2)
    big_gt = np.zeros((40, 60, 50), dtype=bool)
    big_pred = big_gt.copy()
    big_gt[20:28, 30:40, 25:35] = small_gt
    big_pred[20:28, 30:40, 25:35] = small_pred
    spacing = (1.5, 0.6, 0.9)
    assert surface_metrics(big_pred, big_gt, spacing) == pytest.approx(
        surface_metrics(small_pred, small_gt, spacing)
    )


def test_shift_hd95_equals_shift_in_mm():
    gt = _box((12, 20, 20), (2, 4, 4), (10, 16, 16))
    pred = np.roll(gt, 3, axis=1)  # 3 rows at 0.8 mm
    spacing = (2.0, 0.8, 0.7)
    d_p, d_g = surface_distances(pred, gt, spacing)
    assert max(d_p.max(), d_g.max()) == pytest.approx(3 * 0.8)
    assert 0 < hd95(pred, gt, spacing) <= 3 * 0.8 + 1e-9


def test_tolerance_validation():
    m = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    with pytest.raises(ValueError, match="tolerance"):
        surface_metrics(m, m, SPACING, tolerance_mm=-1.0)


# ------------------------------------------------------------------------------------------------ summary


def test_summarize_excludes_nan_and_counts():
    s = summarize([1.0, math.nan, 0.5, 0.0])
    assert s["n"] == 3
    assert s["n_undefined"] == 1
    assert s["mean"] == pytest.approx(0.5)
    assert s["median"] == pytest.approx(0.5)
    assert s["min"] == 0.0
    assert s["max"] == 1.0
    assert s["std"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    none = summarize([math.nan])
    assert none["n"] == 0
    assert none["mean"] is None
    assert none["n_undefined"] == 1
    assert summarize([])["n"] == 0


def test_rule_text_names_both_cases():
    assert "both masks empty" in EMPTY_MASK_RULE
    assert "exactly one empty -> 0.0" in EMPTY_MASK_RULE
    assert "HD95" in EMPTY_MASK_RULE
