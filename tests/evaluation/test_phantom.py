"""Tests for kitsseg.evaluation.phantom: plausible anatomy in the frame, determinism, and layouts on disk."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kitsseg.evaluation.phantom import HU, kits19_affine, make_phantom, write_phantom

SHAPE = (24, 64, 56)  # not square, so a swapped row/column axis cannot go unnoticed
SPACING = (2.5, 0.8, 0.7)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_phantom(SHAPE, SPACING, seed=3, n_tumors=2)


def test_types_shapes_and_labels(phantom) -> None:
    ct, labels = phantom
    assert ct.shape == labels.shape == SHAPE
    assert ct.dtype == np.float32
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}


def test_same_seed_same_phantom_other_seed_differs() -> None:
    a_ct, a_lab = make_phantom(SHAPE, SPACING, seed=11)
    b_ct, b_lab = make_phantom(SHAPE, SPACING, seed=11)
    c_ct, c_lab = make_phantom(SHAPE, SPACING, seed=12)
    np.testing.assert_array_equal(a_ct, b_ct)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_ct, c_ct)
    assert not np.array_equal(a_lab, c_lab)  # tumors move with the seed


def test_tissue_values_look_like_ct(phantom) -> None:
    ct, labels = phantom
    assert np.all(ct[:, :2, :2] == HU["air"])  # corners are air, without noise
    kidney, tumor = ct[labels == 1], ct[labels == 2]
    assert 150 <= kidney.mean() <= 200
    assert 60 <= tumor.mean() <= 90
    assert abs(kidney.std() - 10.0) < 2.0  # mild noise
    assert ct.max() > 400  # bone
    # Fat (about -100 HU) surrounds soft tissue: the body edge along the middle row.
    row = ct[SHAPE[0] // 2, SHAPE[1] // 2]
    inside = np.nonzero(row > -500)[0]
    assert -160 < row[inside[0]] < -40
    assert -160 < row[inside[-1]] < -40


def test_kidneys_posterior_left_and_right_of_the_spine(phantom) -> None:
    ct, labels = phantom
    mid_row, mid_col = SHAPE[1] / 2, SHAPE[2] / 2
    kidney = labels == 1
    comps, n = ndimage.label(labels > 0)
    assert n == 2
    centroids = ndimage.center_of_mass(kidney, comps, [1, 2])
    cols = sorted(c for _, _, c in centroids)
    assert cols[0] < mid_col < cols[1]  # one kidney each side of the midline
    assert all(r > mid_row for _, r, _ in centroids)  # both in the posterior half (rows run A->P)
    # The spine sits between them, behind the midline.
    bone = ct > 300
    _, b_row, b_col = ndimage.center_of_mass(bone)
    assert cols[0] < b_col < cols[1]
    assert b_row > mid_row
    assert not np.any(bone & (labels > 0))
    # Kidneys appear in some slices but not all (the tumor model skips kidney-free slices).
    with_kidney = np.any(labels > 0, axis=(1, 2))
    assert 0.2 < with_kidney.mean() < 0.9


def test_right_kidney_is_a_little_lower(phantom) -> None:
    _, labels = phantom
    comps, _ = ndimage.label(labels > 0)
    centroids = sorted(ndimage.center_of_mass(labels > 0, comps, [1, 2]), key=lambda c: c[2])
    right, left = centroids  # columns run from the patient's right to left
    assert right[0] > left[0]  # z runs superior -> inferior


def test_tumors_touch_a_kidney(phantom) -> None:
    _, labels = phantom
    tumors, n = ndimage.label(labels == 2)
    assert 1 <= n <= 2  # two tumors may merge
    grown = ndimage.binary_dilation(labels == 1)
    for k in range(1, n + 1):
        assert np.any(grown & (tumors == k))


def test_tumor_and_kidney_counts_are_options() -> None:
    _, none = make_phantom(SHAPE, SPACING, n_tumors=0)
    assert set(np.unique(none)) == {0, 1}
    _, empty = make_phantom(SHAPE, SPACING, n_tumors=0, n_kidneys=0)
    assert not empty.any()
    _, one = make_phantom(SHAPE, SPACING, n_tumors=1, n_kidneys=1)
    assert ndimage.label(one > 0)[1] == 1
    with pytest.raises(ValueError, match="kidney"):
        make_phantom(SHAPE, SPACING, n_tumors=1, n_kidneys=0)
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(SHAPE, (0.0, 1.0, 1.0))


def test_noise_free_phantom_has_exact_values() -> None:
    ct, labels = make_phantom(SHAPE, SPACING, noise_hu=0.0)
    assert len(np.unique(ct[labels == 1])) <= 2  # one value per kidney


def test_kits19_affine_has_kits19_axis_codes() -> None:
    aff = kits19_affine(SPACING)
    assert nib.aff2axcodes(aff) == ("I", "P", "L")
    np.testing.assert_allclose(nib.affines.voxel_sizes(aff), SPACING)
    # The exact KiTS19 pattern [[0,0,-pw],[0,-pw,0],[-st,0,0]].
    np.testing.assert_allclose(aff[:3, :3], [[0, 0, -0.7], [0, -0.8, 0], [-2.5, 0, 0]])


@pytest.mark.parametrize(
    ("layout", "axcodes", "stored_shape"),
    [
        ("kits19", ("I", "P", "L"), SHAPE),
        ("ras", ("R", "A", "S"), SHAPE[::-1]),
        ("lps", ("L", "P", "S"), SHAPE[::-1]),
    ],
)
def test_write_phantom_layouts_describe_the_same_voxels(
    tmp_path: Path, layout: str, axcodes: tuple[str, ...], stored_shape: tuple[int, ...]
) -> None:
    ct_path, labels_path = write_phantom(tmp_path, layout, shape=SHAPE, spacing=SPACING, seed=5)
    assert ct_path == tmp_path / "case_00000" / "imaging.nii.gz"
    assert labels_path == tmp_path / "case_00000" / "segmentation.nii.gz"
    ct_img, lab_img = nib.load(ct_path), nib.load(labels_path)
    assert nib.aff2axcodes(ct_img.affine) == axcodes
    assert ct_img.shape == lab_img.shape == stored_shape
    assert ct_img.get_data_dtype() == np.float32
    assert lab_img.get_data_dtype() == np.uint8
    # Independent of kitsseg.io: world positions of the tumor centre and of a voxel value agree.
    ct, labels = make_phantom(SHAPE, SPACING, seed=5)
    expected = nib.affines.apply_affine(kits19_affine(SPACING), ndimage.center_of_mass(labels == 2))
    stored = np.asanyarray(lab_img.dataobj)
    got = nib.affines.apply_affine(lab_img.affine, ndimage.center_of_mass(stored == 2))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    world = nib.affines.apply_affine(kits19_affine(SPACING), [3, 40, 17])
    ijk = np.round(nib.affines.apply_affine(np.linalg.inv(ct_img.affine), world)).astype(int)
    assert np.asanyarray(ct_img.dataobj)[tuple(ijk)] == ct[3, 40, 17]
