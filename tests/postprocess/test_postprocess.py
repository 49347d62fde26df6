"""Post-processing on constructed masks whose right answer is known by construction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from kitsseg.arrays import bounding_box
from kitsseg.errors import GridMismatchError, InvalidImageError
from kitsseg.postprocess.components import (
    Component,
    component_stats,
    eigenvalue_ratio,
    kidney_side,
    max_axial_diameter,
)
from kitsseg.postprocess.fill import fill_holes
from kitsseg.postprocess.kidneys import keep_largest_components
from kitsseg.postprocess.pipeline import PostprocessOptions, merge_labels, postprocess
from kitsseg.postprocess.tumors import filter_tumors


def ellipsoid(shape, centre, semi_axes) -> np.ndarray:
    """Voxels whose index lies inside the ellipsoid (semi-axes in voxels, per frame axis)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, semi_axes, strict=True))
    return inside <= 1.0


def box(shape, z, r, c) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[z[0] : z[1], r[0] : r[1], c[0] : c[1]] = True
    return m


# ----------------------------------------------------------------------------------------------- fill holes


def test_fill_holes_fills_hollow_sphere():
    shape = (30, 32, 34)
    solid = ellipsoid(shape, (15, 16, 17), (10, 10, 10))
    hollow = solid & ~ellipsoid(shape, (15, 16, 17), (6, 6, 6))
    assert hollow.sum() < solid.sum()
    filled = fill_holes(hollow)
    assert filled.dtype == np.bool_
    np.testing.assert_array_equal(filled, solid)


def test_fill_holes_leaves_open_cup_alone():
    shape = (20, 20, 20)
    cup = box(shape, (4, 16), (4, 16), (4, 16)) & ~box(shape, (6, 17), (6, 14), (6, 14))  # open at the top
    np.testing.assert_array_equal(fill_holes(cup), cup)


def test_fill_holes_empty_and_input_untouched():
    empty = np.zeros((5, 6, 7), dtype=bool)
    assert not fill_holes(empty).any()
    shape = (12, 12, 12)
    hollow = box(shape, (2, 10), (2, 10), (2, 10)) & ~box(shape, (4, 8), (4, 8), (4, 8))
    before = hollow.copy()
    fill_holes(hollow)
    np.testing.assert_array_equal(hollow, before)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fill_holes_on_bbox_equals_scipy_full_volume(seed):
    """Random blobby masks, some touching the volume border, some with cavities: same as scipy's."""
    rng = np.random.default_rng(seed)
    shape = (24, 28, 26)
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.2)
    mask = noise > np.quantile(noise, 0.25)
    # confine it to a sub-box that touches the low-z and high-col borders only
    region = box(shape, (0, 18), (5, 22), (7, 26))
    mask &= region
    # a shell in the volume's corner: one cavity closed by its walls, one open through the volume border
    mask[:6, :6, :6] = True
    mask[1:4, 1:4, 1:4] = False
    mask[0:2, 4, 4] = False
    expected = ndimage.binary_fill_holes(mask)
    assert expected[1:4, 1:4, 1:4].all()
    assert not expected[0:2, 4, 4].any()
    assert (expected & ~mask).sum() > 27 + 2, "the random part should have holes too"
    np.testing.assert_array_equal(fill_holes(mask), expected)
    np.testing.assert_array_equal(fill_holes(mask.astype(np.uint8)), expected)


def test_fill_holes_per_component_equals_scipy_on_random_masks():
    """Filling each 26-connected component on its own box must equal filling the whole mask, also for
    dense random masks where many components touch and cavities lie between several of them."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(4, 13, 3))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_fill_holes_nested_shells():
    """A shell inside another shell's cavity: both cavities are filled, as scipy does."""
    shape = (16, 16, 16)
    outer = box(shape, (1, 15), (1, 15), (1, 15)) & ~box(shape, (3, 13), (3, 13), (3, 13))
    inner = box(shape, (5, 11), (5, 11), (5, 11)) & ~box(shape, (7, 9), (7, 9), (7, 9))
    mask = outer | inner
    filled = fill_holes(mask)
    np.testing.assert_array_equal(filled, ndimage.binary_fill_holes(mask))
    assert filled[1:15, 1:15, 1:15].all()


def assert_labelling_of_filled(mask: np.ndarray) -> None:
    """``_fill_labelled`` gives scipy's filling and exactly the 26-connected labelling of the filled mask."""
    from kitsseg.postprocess.fill import _fill_labelled

    filled, tl = _fill_labelled(mask)
    expected = ndimage.binary_fill_holes(mask)
    np.testing.assert_array_equal(filled, expected)
    if not expected.any():
        assert tl.box is None
        return
    crop = expected[tl.box]
    assert crop.sum() == expected.sum(), "the box must hold the whole filled mask"
    labels, n = ndimage.label(crop, structure=np.ones((3, 3, 3), dtype=bool))
    np.testing.assert_array_equal(tl.labels, labels)
    assert tl.objects == list(ndimage.find_objects(labels))
    assert len(tl.objects) == n


def test_filling_labels_equal_a_fresh_labelling_on_random_masks():
    rng = np.random.default_rng(12)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(4, 13, 3))
        assert_labelling_of_filled(rng.random(shape) < rng.uniform(0.2, 0.8))


def test_filling_labels_merge_components_inside_a_cavity():
    """Shells nested two deep, with a speck in the innermost cavity and a separate blob after them in
    raster order: the nested ones merge into the outer shell and the blob's number moves up."""
    shape = (20, 20, 24)
    outer = box(shape, (1, 15), (1, 15), (1, 15)) & ~box(shape, (3, 13), (3, 13), (3, 13))
    inner = box(shape, (5, 11), (5, 11), (5, 11)) & ~box(shape, (6, 10), (6, 10), (6, 10))
    speck = box(shape, (8, 9), (8, 9), (8, 9))
    blob = box(shape, (16, 19), (2, 6), (18, 22))
    mask = outer | inner | speck | blob
    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 4
    assert_labelling_of_filled(mask)
    assert_labelling_of_filled(np.zeros(shape, dtype=bool))
    assert_labelling_of_filled(speck)


def test_non_3d_mask_rejected():
    with pytest.raises(InvalidImageError, match="3D"):
        fill_holes(np.zeros((4, 4), dtype=bool))


def test_bounding_box_with_padding_clipped():
    m = box((10, 10, 10), (0, 3), (4, 6), (8, 10))
    assert bounding_box(m) == (slice(0, 3), slice(4, 6), slice(8, 10))
    assert bounding_box(m, pad=1) == (slice(0, 4), slice(3, 7), slice(7, 10))
    assert bounding_box(np.zeros((3, 3, 3))) is None


# ----------------------------------------------------------------------------------------- largest components


def test_keep_two_largest_of_three_kidney_blobs():
    shape = (20, 40, 60)
    big = box(shape, (2, 18), (5, 30), (5, 20))
    medium = box(shape, (2, 15), (5, 25), (35, 50))
    small = box(shape, (2, 5), (33, 36), (52, 55))  # 27 voxels, the false positive
    mask = big | medium | small
    out, removed = keep_largest_components(mask, num_components=2, spacing=(2.0, 1.0, 0.5))
    np.testing.assert_array_equal(out, big | medium)
    assert len(removed) == 1
    comp = removed[0]
    assert isinstance(comp, Component)
    assert comp.voxels == 27
    assert comp.bbox == ((2, 5), (33, 36), (52, 55))
    assert comp.centroid == pytest.approx((3.0, 34.0, 53.0))
    assert comp.volume_ml == pytest.approx(27 * 1.0 / 1000)
    assert comp.kind == "kidney"
    assert "2 largest" in comp.reason


def test_keep_largest_connectivity_and_counts():
    shape = (10, 10, 10)
    a = box(shape, (1, 4), (1, 4), (1, 4))
    b = box(shape, (4, 6), (4, 6), (4, 6))  # touches a only at a corner
    mask = a | b
    out26, removed26 = keep_largest_components(mask, num_components=1, connectivity=3)
    np.testing.assert_array_equal(out26, mask)
    assert removed26 == []
    out6, removed6 = keep_largest_components(mask, num_components=1, connectivity=1)
    np.testing.assert_array_equal(out6, a)
    assert [c.voxels for c in removed6] == [8]
    assert removed6[0].volume_ml is None  # no spacing given


def test_keep_largest_empty_mask():
    out, removed = keep_largest_components(np.zeros((4, 5, 6), dtype=bool))
    assert not out.any()
    assert removed == []


# ------------------------------------------------------------------------------------------ eigenvalue ratio


def test_eigenvalue_ratio_sphere_is_one():
    sphere = ellipsoid((25, 25, 25), (12, 12, 12), (9, 9, 9))
    assert eigenvalue_ratio(sphere) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("axes", [(20, 10, 5), (9, 18, 6), (6, 9, 18), (4, 12, 10)])
def test_eigenvalue_ratio_ellipsoid_is_squared_axis_ratio(axes):
    shape = tuple(2 * a + 3 for a in axes)
    centre = tuple(n // 2 for n in shape)
    mask = ellipsoid(shape, centre, axes)
    a, b, _ = sorted(axes, reverse=True)
    assert eigenvalue_ratio(mask) == pytest.approx((a / b) ** 2, rel=0.03)
    # coordinates and a crop give the same ratio: the covariance does not see translations
    assert eigenvalue_ratio(np.argwhere(mask)) == pytest.approx(eigenvalue_ratio(mask))
    assert eigenvalue_ratio(np.argwhere(mask) + 100) == pytest.approx(eigenvalue_ratio(mask))


def test_eigenvalue_ratio_mm_uses_spacing():
    # 10 x 10 x 5 voxels of semi-axis; with 2 mm slices the z axis is 20 mm long
    mask = ellipsoid((25, 25, 13), (12, 12, 6), (10, 10, 5))
    voxel = eigenvalue_ratio(mask, unit="voxel")
    mm = eigenvalue_ratio(mask, unit="mm", spacing=(2.0, 1.0, 1.0))
    assert voxel == pytest.approx(1.0, abs=0.03)
    assert mm == pytest.approx((20 / 10) ** 2, rel=0.03)
    # isotropic spacing changes nothing
    assert eigenvalue_ratio(mask, unit="mm", spacing=(0.7, 0.7, 0.7)) == pytest.approx(voxel)
    with pytest.raises(ValueError, match="spacing"):
        eigenvalue_ratio(mask, unit="mm")
    with pytest.raises(ValueError, match="unit"):
        eigenvalue_ratio(mask, unit="cm")  # type: ignore[arg-type]


def test_eigenvalue_ratio_degenerate_is_inf():
    line = np.zeros((5, 20, 5), dtype=bool)
    line[2, 3:17, 2] = True
    assert eigenvalue_ratio(line) == math.inf
    single = np.zeros((3, 3, 3), dtype=bool)
    single[1, 1, 1] = True
    assert eigenvalue_ratio(single) == math.inf
    flat = box((3, 10, 10), (1, 2), (2, 8), (2, 8))  # one slice: l3 = 0 but l2 > 0
    assert eigenvalue_ratio(flat) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- tumor filter


@pytest.fixture
def tumor_scene():
    """Kidney+tumor mask, and a tumor mask with one good tumor, a needle, an outsider and a speck."""
    shape = (40, 60, 60)
    kidney = box(shape, (5, 35), (5, 40), (5, 40))
    good = ellipsoid(shape, (20, 20, 20), (6, 5, 5))
    needle = box(shape, (5, 35), (30, 32), (30, 32))  # 30 x 2 x 2
    outsider = ellipsoid(shape, (20, 50, 50), (6, 4, 4))
    speck = box(shape, (8, 9), (8, 10), (8, 10)) & ~box(shape, (8, 9), (9, 10), (9, 10))  # 3 voxels
    return kidney, good, needle, outsider, speck


def test_filter_tumors_removes_needle_outsider_and_speck(tumor_scene):
    kidney, good, needle, outsider, speck = tumor_scene
    tumor = good | needle | outsider | speck
    out, kept, removed = filter_tumors(tumor, kidney | good, spacing=(1.0, 0.8, 0.8))
    np.testing.assert_array_equal(out, good)
    assert len(kept) == 1
    assert kept[0].kind == "tumor"
    assert kept[0].overlap == pytest.approx(1.0)
    assert 1.07 <= kept[0].eigenvalue_ratio <= 2.8
    assert kept[0].max_axial_diameter_mm == pytest.approx(11 * 0.8, abs=0.8)
    reasons = sorted(c.reason for c in removed)
    assert len(reasons) == 3
    assert any(r.startswith("eigenvalue ratio") and "outside [1.07, 2.8]" in r for r in reasons)
    assert any("0% inside kidney+tumor mask" in r for r in reasons)
    assert any(r.startswith("speck of 3 voxels") for r in reasons)
    by_reason = {c.reason.split()[0]: c for c in removed}
    assert by_reason["eigenvalue"].voxels == 120
    assert by_reason["eigenvalue"].eigenvalue_ratio > 100
    assert by_reason["only"].overlap == 0.0


def test_filter_tumors_switches(tumor_scene):
    kidney, good, needle, outsider, speck = tumor_scene
    tumor = good | needle | outsider
    out, _, removed = filter_tumors(tumor, kidney, eig_bounds=None)
    np.testing.assert_array_equal(out, good | needle)
    assert len(removed) == 1
    out, _, _ = filter_tumors(tumor, kidney, min_overlap=None)
    np.testing.assert_array_equal(out, good | outsider)
    out, kept, removed = filter_tumors(tumor | speck, kidney, eig_bounds=None, min_overlap=None, min_voxels=0)
    np.testing.assert_array_equal(out, tumor | speck)
    assert removed == []
    assert len(kept) == 4


def test_filter_tumors_partial_overlap_threshold():
    shape = (20, 30, 30)
    tumor = box(shape, (2, 18), (5, 15), (5, 15))  # 1600 voxels, ratio (16**2 - 1) / (10**2 - 1)
    kidney = box(shape, (2, 18), (5, 15), (5, 14))  # 1440 of them: 90%
    out, _, removed = filter_tumors(tumor, kidney, min_overlap=0.95)
    assert not out.any()
    assert "only 90% inside" in removed[0].reason
    out, kept, _ = filter_tumors(tumor, kidney, min_overlap=0.9)
    np.testing.assert_array_equal(out, tumor)
    assert kept[0].overlap == pytest.approx(0.9)


def test_small_round_tumors_are_exempt_from_the_lower_shape_bound_only():
    """A round 15 mm tumor (ratio ~1.0 < 1.07) is removed by the paper's rule and kept with
    ``round_exempt_mm=40``; a round 60 mm one is removed either way, and a small needle (ratio far above
    2.8) still is: the exemption lifts only the lower bound, only for small tumors."""
    shape = (50, 90, 90)
    spacing = (1.0, 1.0, 1.0)
    kidney = box(shape, (0, 50), (0, 90), (0, 90))
    small = ellipsoid(shape, (10, 15, 15), (7, 7, 7))  # 15 mm across
    large = ellipsoid(shape, (25, 55, 55), (24, 30, 30))  # about 56 mm sphere-equivalent: not exempt
    needle = box(shape, (40, 48), (5, 7), (80, 81))  # 8 x 2 x 1: ratio far above 2.8
    tumor = small | large | needle
    assert eigenvalue_ratio(small) < 1.07
    assert eigenvalue_ratio(large) < 1.07
    paper, _, _ = filter_tumors(tumor, kidney, spacing=spacing, min_overlap=None)
    assert not paper.any()
    out, kept, removed = filter_tumors(tumor, kidney, spacing=spacing, min_overlap=None, round_exempt_mm=40.0)
    np.testing.assert_array_equal(out, small)
    assert [round(k.eigenvalue_ratio, 2) for k in kept] == [round(eigenvalue_ratio(small), 2)]
    assert len(removed) == 2
    assert all(r.reason.startswith("eigenvalue ratio") for r in removed)
    # Through the pipeline: on by default (40 mm), None restores the paper's rule.
    labels = postprocess(kidney, tumor, spacing=spacing, options=PostprocessOptions(keep_kidneys=False))
    np.testing.assert_array_equal(labels.labels == 2, small)
    off = PostprocessOptions(keep_kidneys=False, round_exempt_mm=None)
    assert not (postprocess(kidney, tumor, spacing=spacing, options=off).labels == 2).any()


def test_filter_tumors_grid_mismatch():
    with pytest.raises(GridMismatchError, match="grid"):
        filter_tumors(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))


# --------------------------------------------------------------------------------------------------- merging


def test_merge_labels_tumor_wins_and_outside_tumor_kept():
    shape = (6, 6, 6)
    kt = box(shape, (1, 4), (1, 4), (1, 4))
    t = box(shape, (2, 3), (2, 3), (2, 5))  # sticks out of kt along columns
    labels = merge_labels(kt, t)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(labels == 2, t)
    np.testing.assert_array_equal(labels == 1, kt & ~t)
    assert labels[2, 2, 4] == 2  # outside the kidney+tumor mask, still tumor


# ----------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture
def raw_masks():
    """Network-like masks: two kidneys (one hollow), a false-positive blob with its own 'tumor',
    a tumor in the left kidney, a needle and a speck."""
    shape = (40, 64, 64)
    right = ellipsoid(shape, (20, 30, 16), (12, 10, 8))
    left = ellipsoid(shape, (20, 30, 48), (12, 10, 8))
    hole = ellipsoid(shape, (20, 30, 48), (3, 3, 3))
    fp_blob = box(shape, (2, 5), (52, 60), (28, 33))
    kt = (right | (left & ~hole) | fp_blob).astype(np.uint8)
    tumor_left = ellipsoid(shape, (20, 30, 50), (5, 4, 3)) & ~ellipsoid(shape, (20, 30, 50), (1, 1, 1))
    fp_tumor = box(shape, (2, 5), (52, 60), (28, 33))  # inside the blob removed with the kidneys
    needle = box(shape, (10, 32), (30, 31), (14, 15))
    speck = box(shape, (30, 31), (20, 22), (16, 17))
    t = (tumor_left | fp_tumor | needle | speck).astype(np.uint8)
    return kt, t, dict(right=right, left=left, fp_blob=fp_blob, tumor_left=tumor_left)


def test_postprocess_all_off_is_raw_merge(raw_masks):
    kt, t, _ = raw_masks
    result = postprocess(kt, t, PostprocessOptions.none(), spacing=(2.0, 0.8, 0.8))
    np.testing.assert_array_equal(result.labels, merge_labels(kt, t))
    assert result.removed == []
    assert len(result.tumors) == 4  # every raw component described, none removed


def test_postprocess_default_pipeline(raw_masks):
    kt, t, parts = raw_masks
    kt_before, t_before = kt.copy(), t.copy()
    result = postprocess(kt, t, spacing=(2.0, 0.8, 0.8))
    np.testing.assert_array_equal(kt, kt_before)
    np.testing.assert_array_equal(t, t_before)
    tumor_filled = ndimage.binary_fill_holes(parts["tumor_left"])
    expected = merge_labels(parts["right"] | parts["left"], tumor_filled)
    np.testing.assert_array_equal(result.labels, expected)
    assert len(result.tumors) == 1
    (tumor,) = result.tumors
    assert tumor.voxels == int(tumor_filled.sum())
    assert tumor.volume_ml == pytest.approx(tumor.voxels * 2.0 * 0.8 * 0.8 / 1000)
    assert tumor.max_axial_diameter_mm == pytest.approx(9 * 0.8, abs=0.8)
    kinds = sorted((c.kind, c.reason.split()[0]) for c in result.removed)
    # the blob goes with the kidneys, its tumor then lies outside the cleaned kidney mask
    assert kinds == [("kidney", "not"), ("tumor", "eigenvalue"), ("tumor", "only"), ("tumor", "speck")]
    assert "PostprocessResult" in repr(result)


def test_postprocess_steps_switch_individually(raw_masks):
    kt, t, parts = raw_masks
    only_kidneys = PostprocessOptions(fill_holes=False, tumor_shape=False, tumor_overlap=False)
    labels = postprocess(kt, t, only_kidneys).labels
    np.testing.assert_array_equal(labels == 1, (parts["right"] | (kt > 0) & parts["left"]) & (t == 0))
    np.testing.assert_array_equal(labels == 2, t > 0)  # no tumor filter: even the speck stays
    no_kidney_step = PostprocessOptions(keep_kidneys=False, tumor_shape=False)
    labels = postprocess(kt, t, no_kidney_step).labels
    assert (labels[parts["fp_blob"]] == 2).all()  # its tumor lies inside the (kept) blob


def test_postprocess_grid_mismatch():
    with pytest.raises(GridMismatchError):
        postprocess(np.zeros((3, 4, 5), bool), np.zeros((3, 4, 4), bool))


# ----------------------------------------------------------------------------------------------- morphometry


def test_max_axial_diameter_line_pixel_and_anisotropy():
    line = np.zeros((3, 5, 30), dtype=bool)
    line[1, 2, 5:25] = True
    assert max_axial_diameter(line, (3.0, 1.0, 0.8)) == pytest.approx(20 * 0.8)
    pixel = np.zeros((1, 3, 3), dtype=bool)
    pixel[0, 1, 1] = True
    assert max_axial_diameter(pixel, (1.0, 2.0, 0.5)) == pytest.approx(2.0)
    rect = box((2, 20, 40), (0, 1), (0, 10), (0, 30))  # 10 rows x 30 cols, rows 2 mm, cols 1 mm
    true = math.hypot(20.0, 30.0)
    assert true - 1.5 < max_axial_diameter(rect, (5.0, 2.0, 1.0)) <= true
    # the diameter is per axial slice: a tall column is not long in-plane
    column = box((40, 5, 5), (0, 40), (2, 3), (2, 3))
    assert max_axial_diameter(column, (5.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert max_axial_diameter(np.zeros((2, 2, 2), bool), (1.0, 1.0, 1.0)) == 0.0


def test_max_axial_diameter_disk_matches_skimage():
    from skimage.measure import regionprops

    disk = ellipsoid((3, 41, 41), (1, 20, 20), (1.5, 15, 15))
    expected = regionprops(disk[1].astype(np.uint8))[0].feret_diameter_max
    assert max_axial_diameter(disk, (1.0, 1.0, 1.0)) == pytest.approx(expected, abs=1.0)
    assert max_axial_diameter(disk, (1.0, 0.5, 0.5)) == pytest.approx(expected * 0.5, abs=0.5)


def test_component_stats_and_side():
    shape = (20, 40, 100)
    right = box(shape, (2, 12), (5, 15), (10, 30))  # columns < 50: the patient's right
    left = box(shape, (2, 8), (5, 10), (70, 80))
    comps = component_stats(right | left, spacing=(2.0, 1.0, 1.0), kind="kidney")
    assert [c.voxels for c in comps] == [2000, 300]
    big, small = comps
    assert big.volume_ml == pytest.approx(2000 * 2.0 / 1000)
    assert big.centroid == pytest.approx((6.5, 9.5, 19.5))
    assert big.max_axial_diameter_mm == pytest.approx(math.hypot(10, 20), abs=1.5)
    assert big.eigenvalue_ratio == pytest.approx((20**2 - 1) / (10**2 - 1), rel=0.01)
    assert kidney_side(big.centroid[2], shape[2]) == "right"
    assert kidney_side(small.centroid[2], shape[2]) == "left"
    d = big.to_dict()
    assert d["bbox"] == [[2, 12], [5, 15], [10, 30]]
    assert component_stats(np.zeros(shape, bool), (1.0, 1.0, 1.0)) == []


def test_component_to_dict_has_no_infinity():
    line = np.zeros((3, 3, 12), dtype=bool)
    line[1, 1, 1:11] = True
    (comp,) = component_stats(line, (1.0, 1.0, 1.0))
    assert comp.eigenvalue_ratio == math.inf
    assert comp.to_dict()["eigenvalue_ratio"] is None


def test_same_level_keeps_the_second_kidney_over_a_larger_blob_below() -> None:
    mask = np.zeros((60, 40, 40), dtype=bool)
    mask[5:20, 10:25, 0:12] = True  # largest: a kidney, slices 5-19 (2700 voxels)
    mask[8:18, 10:18, 28:36] = True  # smaller kidney at the same level
    mask[40:55, 10:22, 14:26] = True  # a blob far below, larger than the second kidney (2160)
    plain, _ = keep_largest_components(mask, 2)
    assert plain[45].any()
    assert not plain[10, :, 28:36].any()
    kept, removed = keep_largest_components(mask, 2, same_level=True)
    assert kept[10, :, 28:36].any()
    assert kept[10, :, 2:12].any()
    assert not kept[40:].any()
    assert len(removed) == 1
    assert "not at the level" in removed[0].reason


def test_same_level_with_one_component_at_that_level_keeps_only_it() -> None:
    mask = np.zeros((60, 20, 20), dtype=bool)
    mask[5:20, 5:15, 5:15] = True
    mask[40:45, 5:8, 5:8] = True
    kept, removed = keep_largest_components(mask, 2, same_level=True)
    assert kept[5:20].sum() == mask[5:20].sum()
    assert not kept[40:].any()
    assert len(removed) == 1


@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 6), (12,), (1, 1, 1)])
@pytest.mark.parametrize("pad", [0, 2])
def test_bounding_box_matches_argwhere(shape: tuple[int, ...], pad: int) -> None:
    from kitsseg.arrays import bounding_box

    rng = np.random.default_rng(len(shape) * 10 + pad)
    for density in (0.0, 0.002, 0.05, 1.0):
        mask = rng.random(shape) < density
        box = bounding_box(mask, pad=pad)
        if not mask.any():
            assert box is None
            continue
        idx = np.argwhere(mask)
        expected = tuple(
            slice(max(int(lo) - pad, 0), min(int(hi) + 1 + pad, n))
            for lo, hi, n in zip(idx.min(axis=0), idx.max(axis=0), shape, strict=True)
        )
        assert box == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_postprocess_on_its_crop_equals_the_steps_on_the_full_volume(seed: int) -> None:
    """The pipeline crops once to both masks' box; labels and reported positions must not change.

    Reference: each public step on the full volume, chained as the paper orders them. Blobs lie away
    from the origin (so a missing shift of bbox/centroid shows) and one touches the volume's edge.
    """
    rng = np.random.default_rng(seed)
    shape = (40, 64, 72)
    kt = ndimage.binary_opening(rng.random(shape) > 0.93, iterations=1)
    kt[10:20, 20:34, 30:44] = True
    kt[14:17, 25:29, 35:39] = False  # a cavity to fill
    kt[30:40, 50:64, 60:72] = True  # touches three volume edges
    tumor = np.zeros(shape, dtype=bool)
    tumor[12:16, 22:30, 30:42] = True  # eigenvalue ratio (12/8)^2 = 2.25: a tumor shape
    tumor[31:35, 52:58, 61:70] = True
    tumor[2:4, 3:5, 5:7] = True  # outside every kidney: removed by the overlap filter
    opts = PostprocessOptions(min_overlap=0.95)
    spacing = (2.0, 0.8, 0.9)

    ref_kt, dropped = keep_largest_components(fill_holes(kt), 2, 3, spacing=spacing, same_level=True)
    ref_t, ref_kept, ref_removed = filter_tumors(fill_holes(tumor), ref_kt, min_overlap=0.95, spacing=spacing)
    expected = merge_labels(ref_kt, ref_t)

    result = postprocess(kt, tumor, opts, spacing)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.labels.shape == shape
    assert [c.to_dict() for c in result.tumors] == [c.to_dict() for c in ref_kept]
    assert [c.to_dict() for c in result.removed] == [c.to_dict() for c in dropped + ref_removed]
    assert result.tumors, "the scene must keep a tumor for the positions to be compared"


def test_postprocess_of_empty_masks_is_all_background() -> None:
    empty = np.zeros((5, 6, 7), dtype=bool)
    result = postprocess(empty, empty)
    assert result.labels.dtype == np.uint8
    assert result.labels.shape == (5, 6, 7)
    assert not result.labels.any()
    assert result.removed == []
    assert result.tumors == []


# --------------------------------------------------------------------------------------------- kidney pairs

SPACING_PAIRS = (3.0, 3.0, 3.0)


def _pair_scene() -> np.ndarray:
    """Two kidney parts on either half at one level, and a larger unpaired midline blob lower down."""
    mask = np.zeros((60, 50, 60), dtype=bool)
    mask[5:20, 20:32, 6:18] = True  # patient's right kidney part: 2160 voxels
    mask[8:16, 22:30, 42:50] = True  # left kidney part: 512 voxels, centroids 108 mm apart
    mask[35:50, 8:22, 24:36] = True  # bladder-like blob on the midline, 2520 voxels: the largest
    return mask


def test_pairs_anchor_on_the_kidney_pair_not_the_larger_unpaired_blob() -> None:
    mask = _pair_scene()
    plain, _ = keep_largest_components(mask, 2, spacing=SPACING_PAIRS, same_level=True)
    assert plain[40, 15, 30]
    assert not plain[10, 25, 10]
    kept, removed = keep_largest_components(mask, 2, spacing=SPACING_PAIRS, same_level=True, pairs=True)
    assert kept[10, 25, 10]
    assert kept[10, 25, 45]
    assert not kept[35:].any()
    assert len(removed) == 1
    assert "without a partner" in removed[0].reason
    assert removed[0].voxels == 2520


def test_pairs_keep_a_solitary_kidney_over_a_pair_of_small_false_positives() -> None:
    mask = np.zeros((60, 50, 60), dtype=bool)
    mask[5:25, 15:35, 5:20] = True  # one kidney (solitary), 6000 voxels
    mask[40:44, 20:30, 10:20] = True  # a pair of false positives lower down: 400 voxels each, under
    mask[40:44, 20:30, 40:50] = True  # a quarter of the kidney, so they cannot take the anchor
    kept, _ = keep_largest_components(mask, 2, spacing=SPACING_PAIRS, same_level=True, pairs=True)
    assert kept[10, 20, 10]
    assert not kept[40:].any()


def test_pairs_need_lateral_distance_and_the_other_half() -> None:
    mask = _pair_scene()
    mask[:, :, 42:50] = False
    mask[8:16, 22:30, 20:26] = True  # the "partner" now lies on the same half: no pair, blob stays anchor
    kept, _ = keep_largest_components(mask, 2, spacing=SPACING_PAIRS, same_level=True, pairs=True)
    assert kept[40, 15, 30]
    near = _pair_scene()
    near[:, :, 42:50] = False
    near[8:16, 22:30, 31:35] = True  # other half, but centroids 63 voxels * 0.5 mm apart: too close
    kept, _ = keep_largest_components(near, 2, spacing=(3.0, 0.5, 0.5), same_level=True, pairs=True)
    assert kept[40, 15, 30]


def test_pairs_use_the_frame_halves_for_a_cropped_mask() -> None:
    """postprocess works on a crop: the image halves must stay those of the whole CT."""
    mask = np.zeros((60, 50, 200), dtype=bool)
    mask[5:20, 20:32, 70:82] = True  # right kidney part, left of column 100
    mask[8:16, 22:30, 122:130] = True  # left kidney part
    mask[35:50, 8:22, 88:100] = True  # the largest blob, just right of the midline
    crop = mask[:, :, 60:140]  # a crop whose own middle column (40 -> frame 100) still splits them
    off = mask[:, :, 20:140]  # middle column 60 -> frame 80: would put the blob on the other half
    a, _ = keep_largest_components(
        off, 2, spacing=SPACING_PAIRS, same_level=True, pairs=True, frame_cols=(20, 200)
    )
    b, _ = keep_largest_components(crop, 2, spacing=SPACING_PAIRS, same_level=True, pairs=True)
    np.testing.assert_array_equal(a[:, :, 40:], b)
    assert a[10, 25, 55]
    assert a[10, 25, 105]
    assert not a[40].any()


def test_postprocess_switches_pairs_off() -> None:
    mask = _pair_scene()
    tumor = np.zeros_like(mask)
    on = postprocess(mask, tumor, PostprocessOptions(), SPACING_PAIRS).labels
    off = postprocess(mask, tumor, PostprocessOptions(kidney_pairs=False), SPACING_PAIRS).labels
    assert on[10, 25, 45] == 1
    assert on[40, 15, 30] == 0
    assert off[40, 15, 30] == 1
    assert off[10, 25, 45] == 0


_KITS19_LABELS = Path(__file__).resolve().parents[3] / "shared" / "data" / "kits19-labels"


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.skipif(not _KITS19_LABELS.is_dir(), reason="needs ../shared/data/kits19-labels")
def test_pairs_rule_leaves_every_kits19_label_map_unchanged() -> None:
    """The rule must never move the anchor on real anatomy: 209 official label maps, solitary and
    horseshoe kidneys among them, keep exactly what "largest first" keeps."""
    from concurrent.futures import ThreadPoolExecutor

    from kitsseg.io.load import load_labels

    files = sorted(_KITS19_LABELS.glob("case_*.nii.gz"))
    assert len(files) >= 200

    def moved_anchor(path: Path) -> tuple[bool, float]:
        vol = load_labels(path)
        # One labelling per case (the suite's time): the anchor stayed the largest component exactly
        # when no component was dropped for lacking a partner, and then the result is "largest first".
        # With the default slice-gap bridging (10 mm), as segment runs it.
        kept = vol.data > 0
        out, removed = keep_largest_components(
            kept, 2, spacing=vol.spacing, same_level=True, pairs=True, bridge_mm=10.0
        )
        return any("without a partner" in c.reason for c in removed), float(out.sum() / kept.sum())

    with ThreadPoolExecutor(2) as pool:  # decompression and labelling release the GIL
        results = list(pool.map(moved_anchor, files))
    moved = [p.name for p, (bad, _) in zip(files, results, strict=True) if bad]
    assert moved == []
    assert min(frac for _, frac in results) >= 0.998  # the two (bridged) kidneys hold the label map


def test_bridging_joins_kidney_pieces_split_by_missed_slices() -> None:
    """A kidney the 2D model missed on two slices is two pieces, each smaller than a false positive
    elsewhere; bridged across the 6 mm gap it is one component and wins (nothing is added to it)."""
    m = np.zeros((30, 40, 60), dtype=bool)
    m[2:9, 10:20, 5:15] = True  # right kidney, upper piece (700 voxels)
    m[11:18, 10:20, 5:15] = True  # lower piece, after 2 missed slices (3 mm each)
    m[2:18, 10:20, 45:55] = True  # left kidney
    m[22:30, 5:15, 25:36] = True  # a false positive below, larger than either piece (880 voxels)
    spacing = (3.0, 1.0, 1.0)
    plain, _ = keep_largest_components(m, 2, spacing=spacing)
    assert not plain[2:9, 10:20, 5:15].any() or not plain[11:18, 10:20, 5:15].any()
    bridged, removed = keep_largest_components(m, 2, spacing=spacing, bridge_mm=10.0)
    expected = m.copy()
    expected[22:30] = False
    np.testing.assert_array_equal(bridged, expected)
    assert [c.voxels for c in removed] == [880]
    # A gap wider than bridge_mm stays a gap.
    wide, _ = keep_largest_components(m, 2, spacing=(6.0, 1.0, 1.0), bridge_mm=10.0)
    assert not (wide[2:9, 10:20, 5:15].any() and wide[11:18, 10:20, 5:15].any())


@pytest.mark.parametrize(
    ("spacing", "bridge_mm"), [((1e-7, 1.0, 1.0), 10.0), ((3.0, 1.0, 1.0), 1e9), ((3.0, 1.0, 1.0), math.inf)]
)
def test_bridging_reach_is_bounded_by_the_mask(spacing: tuple[float, float, float], bridge_mm: float) -> None:
    """A reach far beyond the mask's height (a 1e-7 mm slice spacing in a header, ``--bridge-mm 1e9`` or
    ``inf``) bridges like a reach of the whole height, at once: it used to hang, run out of memory or raise
    ``OverflowError``."""
    m = np.zeros((30, 40, 60), dtype=bool)
    m[2:9, 10:20, 5:15] = True
    m[20:28, 10:20, 5:15] = True  # the same column, 11 slices further down
    m[2:18, 10:20, 45:55] = True
    m[22:30, 5:15, 25:36] = True
    kept, removed = keep_largest_components(m, 2, spacing=spacing, bridge_mm=bridge_mm)
    expected, _ = keep_largest_components(m, 2, spacing=(1.0, 1.0, 1.0), bridge_mm=60.0)
    np.testing.assert_array_equal(kept, expected)
    assert kept[2:9, 10:20, 5:15].all()
    assert kept[20:28, 10:20, 5:15].all()
    assert [c.voxels for c in removed] == [880]
