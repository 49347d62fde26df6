"""Tests for kitsseg.io (frame, load, save): one frame from any layout, exact round trips, clear errors."""

from __future__ import annotations

import errno
import gzip
import hashlib
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsseg.errors import (
    InputNotFoundError,
    InvalidImageError,
    KitssegError,
    OutputError,
    ResourceError,
)
from kitsseg.io import load as loader
from kitsseg.io.frame import FRAME_AXCODES, Volume, VolumeWarning, kits19_affine, same_grid
from kitsseg.io.inputs import case_name, find_nifti
from kitsseg.io.load import load_ct, load_labels
from kitsseg.io.save import save_labels, write_frame

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PHANTOM_SHAPE = (24, 64, 64)  # conftest's phantom
PHANTOM_SPACING = (2.5, 0.8, 0.7)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(arr: np.ndarray, affine: np.ndarray, path: Path, **header: float) -> Path:
    img = nib.Nifti1Image(arr, affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def _save_raw(
    arr: np.ndarray,
    affine: np.ndarray | None,
    path: Path,
    slope: float = np.nan,
    inter: float = np.nan,
    pixdim: tuple[float, float, float] | None = None,
) -> Path:
    """Write a NIfTI by hand, exactly as given (nib.save would rescale data and fix odd headers)."""
    header = nib.Nifti1Header()
    header.set_data_shape(arr.shape)
    header.set_data_dtype(arr.dtype)
    if affine is not None:
        header.set_sform(affine, code=1)
    if pixdim is not None:
        header["pixdim"][1:4] = pixdim
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = 352
    blob = header.binaryblock + b"\0\0\0\0" + arr.tobytes(order="F")
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def _ct_array(shape: tuple[int, ...] = (6, 7, 5), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1000, 1500, size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------------- one frame


def test_every_layout_loads_to_the_phantom_frame(phantom_case) -> None:
    ct = load_ct(phantom_case.ct_path)
    labels = load_labels(phantom_case.labels_path)
    assert ct.data.dtype == np.float32
    assert ct.data.flags.c_contiguous
    assert ct.data.shape == PHANTOM_SHAPE
    np.testing.assert_array_equal(ct.data, phantom_case.ct)
    np.testing.assert_array_equal(labels.data, phantom_case.labels)
    assert labels.data.dtype == np.uint8
    assert ct.spacing == pytest.approx(PHANTOM_SPACING)
    assert labels.spacing == pytest.approx(PHANTOM_SPACING)
    np.testing.assert_allclose(ct.frame_affine, kits19_affine(PHANTOM_SPACING), atol=1e-6)
    assert nib.aff2axcodes(ct.frame_affine) == FRAME_AXCODES
    assert same_grid(ct, labels)


def test_kits19_and_ras_files_differ_on_disk_but_share_the_grid(kits19_case, ras_case) -> None:
    raw_k = np.asanyarray(nib.load(kits19_case.ct_path).dataobj)
    raw_r = np.asanyarray(nib.load(ras_case.ct_path).dataobj)
    assert raw_k.shape == (24, 64, 64)
    assert raw_r.shape == (64, 64, 24)  # (x, y, z): the axial axis is last on disk
    a, b = load_ct(kits19_case.ct_path), load_ct(ras_case.ct_path)
    np.testing.assert_array_equal(a.data, b.data)
    assert same_grid(a, b)
    assert a.geometry.axcodes == ("I", "P", "L")
    assert b.geometry.axcodes == ("R", "A", "S")


def test_frame_rows_are_anterior_to_posterior_and_columns_right_to_left(tmp_path: Path) -> None:
    # One bright voxel at a known world position in a RAS file must land at the predicted frame index.
    arr = np.full((5, 6, 4), -1000.0, dtype=np.float32)  # (x, y, z) = (R->, A->, S->)
    arr[4, 5, 3] = 300.0  # the most right, most anterior, most superior voxel
    path = _save(arr, np.diag([0.7, 0.8, 2.5, 1.0]), tmp_path / "ras.nii")
    vol = load_ct(path)
    assert vol.data.shape == (4, 6, 5)
    # Most superior -> z index 0; most anterior -> row 0; patient's most right -> column 0.
    assert np.unravel_index(np.argmax(vol.data), vol.data.shape) == (0, 0, 0)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))


def test_same_grid_detects_different_spacing_and_shape(tmp_path: Path) -> None:
    data = _ct_array()
    a = load_ct(write_frame(data, tmp_path / "a.nii.gz", spacing=(2.0, 0.8, 0.8)))
    b = load_ct(write_frame(data, tmp_path / "b.nii.gz", spacing=(2.0, 0.8, 0.9)))
    c = load_ct(write_frame(data[:-1], tmp_path / "c.nii.gz", spacing=(2.0, 0.8, 0.8)))
    d = load_ct(write_frame(data, tmp_path / "d.nii", spacing=(2.0, 0.8, 0.8), layout="lps"))
    assert not same_grid(a, b)
    assert not same_grid(a, c)
    assert same_grid(a, d)


def test_repr_is_informative(ras_case) -> None:
    text = repr(load_ct(ras_case.ct_path))
    assert "shape=(24, 64, 64)" in text
    assert "2.5, 0.8, 0.7" in text
    assert "RAS" in text
    assert "(64, 64, 24)" in text


def test_loading_never_changes_the_input(phantom_case) -> None:
    before = _sha(phantom_case.ct_path)
    vol = load_ct(phantom_case.ct_path)
    vol.data[:] = 0  # the array is ours, not a view of the file
    assert _sha(phantom_case.ct_path) == before


def test_uncompressed_file_is_copied_not_memory_mapped(tmp_path: Path) -> None:
    path = write_frame(_ct_array(), tmp_path / "ct.nii", spacing=(1.0, 1.0, 1.0))
    before = _sha(path)
    vol = load_ct(path)
    assert not isinstance(vol.data, np.memmap)
    vol.data += 1
    assert _sha(path) == before


def test_scl_slope_scaled_int16_loads_in_hu(tmp_path: Path) -> None:
    stored = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) * 100
    path = _save_raw(stored, kits19_affine((3.0, 0.5, 0.5)), tmp_path / "scaled.nii.gz", 0.5, -1024.0)
    proxy = nib.load(path).dataobj  # nibabel moves the header's scaling onto the data proxy
    assert (proxy.slope, proxy.inter) == (0.5, -1024.0)
    vol = load_ct(path)
    np.testing.assert_allclose(vol.data, stored * 0.5 - 1024.0)
    assert vol.data.dtype == np.float32


def test_singleton_fourth_axis_is_dropped(tmp_path: Path) -> None:
    data = _ct_array((5, 6, 7, 1))
    vol = load_ct(_save(data, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "t1.nii.gz"))
    assert vol.data.shape == (7, 6, 5)


def test_4d_needs_a_volume_index(tmp_path: Path) -> None:
    data = _ct_array((5, 6, 7, 3))
    path = _save(data, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "t3.nii.gz")
    with pytest.raises(InvalidImageError, match="3 volumes"):
        load_ct(path)
    vol = load_ct(path, volume_index=2)
    expected = load_ct(_save(data[..., 2], np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "v2.nii.gz"))
    np.testing.assert_array_equal(vol.data, expected.data)
    with pytest.raises(InvalidImageError, match="out of range"):
        load_ct(path, volume_index=3)
    with pytest.raises(InvalidImageError):
        load_labels(path)


def test_save_labels_from_a_4d_input_writes_3d_labels(tmp_path: Path) -> None:
    path = _save(_ct_array((5, 6, 7, 2)), np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "t2.nii.gz")
    vol = load_ct(path, volume_index=1)
    out = save_labels(np.ones(vol.data.shape, np.uint8), vol, tmp_path / "labels.nii.gz")
    assert nib.load(out).shape == (5, 6, 7)


# --------------------------------------------------------------------------------------------- bad inputs


def test_missing_file_is_input_not_found(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_ct(tmp_path / "nope.nii.gz")
    with pytest.raises(InputNotFoundError):
        load_labels(tmp_path / "nope.nii.gz")


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="folder"):
        load_ct(tmp_path)


def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(InvalidImageError, match=r"not a readable NIfTI file.*\.nii or \.nii\.gz"):
        load_ct(path)


def test_plain_text_gzip_named_nii_gz(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello " * 100))
    with pytest.raises(InvalidImageError, match="not a readable NIfTI"):
        load_ct(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    full = write_frame(_ct_array((20, 30, 30)), tmp_path / "full.nii.gz", spacing=(1.0, 1.0, 1.0))
    blob = full.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InvalidImageError, match="not a readable NIfTI"):
        load_ct(path)


def test_truncated_uncompressed(tmp_path: Path) -> None:
    full = write_frame(_ct_array(), tmp_path / "full.nii", spacing=(1.0, 1.0, 1.0))
    path = tmp_path / "cut.nii"
    path.write_bytes(full.read_bytes()[:-10])
    with pytest.raises(InvalidImageError, match="truncated"):
        load_ct(path)


def test_2d_image(tmp_path: Path) -> None:
    path = _save(_ct_array((8, 9)), np.eye(4), tmp_path / "flat.nii.gz")
    with pytest.raises(InvalidImageError, match="2D"):
        load_ct(path)


def test_zero_length_axis(tmp_path: Path) -> None:
    path = _save(np.zeros((4, 0, 5), np.float32), np.eye(4), tmp_path / "empty.nii")
    with pytest.raises(InvalidImageError, match="empty axis"):
        load_ct(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_counted(tmp_path: Path, bad: float) -> None:
    data = _ct_array()
    data[1, 2, 3] = bad
    data[0, 0, 0] = bad
    path = _save(data, np.eye(4), tmp_path / "nan.nii.gz")
    with pytest.raises(InvalidImageError, match=r"has 2 of 210 voxels that are NaN or infinite"):
        load_ct(path)


def test_complex_voxels(tmp_path: Path) -> None:
    path = _save(_ct_array().astype(np.complex64), np.eye(4), tmp_path / "complex.nii")
    with pytest.raises(InvalidImageError, match="complex"):
        load_ct(path)


@pytest.mark.parametrize("pixdim", [0.0, -1.0, np.nan])
def test_bad_spacing_in_pixdim(tmp_path: Path, pixdim: float) -> None:
    path = _save_raw(_ct_array(), None, tmp_path / "pixdim.nii", pixdim=(1.0, pixdim, 1.0))
    assert nib.load(path).header.get_sform(coded=True)[1] == 0
    with pytest.raises(InvalidImageError, match="spacing"):
        load_ct(path)


def test_zero_spacing_in_affine(tmp_path: Path) -> None:
    path = _save_raw(_ct_array(), np.diag([1.0, 0.0, 1.0, 1.0]), tmp_path / "flat.nii")
    with pytest.raises(InvalidImageError, match="spacing|orientation|affine"):
        load_ct(path)


def test_normalised_values_warn_but_load(tmp_path: Path) -> None:
    data = np.random.default_rng(0).uniform(0, 1, size=(4, 5, 6)).astype(np.float32)
    path = _save(data, np.eye(4), tmp_path / "norm.nii.gz")
    with pytest.warns(VolumeWarning, match="Hounsfield"):
        vol = load_ct(path)
    assert vol.data.shape == (6, 5, 4)


@pytest.mark.parametrize(("dtype", "high"), [(np.uint8, 255), (np.int16, 1000)])
def test_windowed_values_without_negatives_warn(tmp_path: Path, dtype: type, high: int) -> None:
    """An 8-bit windowed export (0..255) or a 0..1000 window: no air, no negative value, nothing a CT
    without its intercept would hold either. It used to load without a word, unlike 0..1."""
    data = np.random.default_rng(0).integers(0, high + 1, size=(4, 5, 6)).astype(dtype)
    data[0, 0, 0], data[1, 1, 1] = 0, high
    with pytest.warns(VolumeWarning, match=rf"values from 0 to {high}, which do not look like Hounsfield"):
        vol = load_ct(_save(data, np.eye(4), tmp_path / "windowed.nii.gz"))
    assert vol.data.shape == (6, 5, 4)


def test_missing_intercept_warns(tmp_path: Path) -> None:
    data = np.random.default_rng(0).uniform(0, 3000, size=(4, 5, 6)).astype(np.float32)
    with pytest.warns(VolumeWarning, match="intercept"):
        load_ct(_save(data, np.eye(4), tmp_path / "raw.nii.gz"))


def test_real_hu_does_not_warn(kits19_case) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ct(kits19_case.ct_path)


def test_oblique_affine_warns_and_uses_nearest_axes(tmp_path: Path) -> None:
    data = _ct_array((6, 7, 5))
    angle = np.radians(10.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.8, 2.5])
    oblique = _save(data, affine, tmp_path / "oblique.nii.gz")
    straight = _save(data, np.diag([0.7, 0.8, 2.5, 1.0]), tmp_path / "straight.nii.gz")
    with pytest.warns(VolumeWarning, match="oblique"):
        vol = load_ct(oblique)
    assert vol.geometry.oblique
    np.testing.assert_array_equal(vol.data, load_ct(straight).data)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    # Labels go back onto the oblique grid unchanged.
    labels = (vol.data > 0).astype(np.uint8)
    out = save_labels(labels, vol, tmp_path / "labels.nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, nib.load(oblique).affine, atol=1e-6)
    with pytest.warns(VolumeWarning):
        np.testing.assert_array_equal(load_labels(out).data, labels)


def test_too_large_for_memory_is_a_resource_error(kits19_case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_available_memory", lambda: 1000)
    with pytest.raises(ResourceError, match="GiB"):
        load_ct(kits19_case.ct_path)


def test_every_error_is_a_kitsseg_error() -> None:
    for cls in (InputNotFoundError, InvalidImageError, OutputError, ResourceError):
        assert issubclass(cls, KitssegError)


# --------------------------------------------------------------------------------------------- labels


def test_uint16_qform_only_labels_load_as_uint8(tmp_path: Path) -> None:
    labels = np.zeros((5, 8, 9), np.uint16)
    labels[2, 3:5, 4:6] = 2
    labels[1, 1:3, 1:3] = 1
    affine = kits19_affine((3.0, 0.7, 0.7))
    img = nib.Nifti1Image(labels, affine, dtype=np.uint16)
    img.set_qform(affine, code=1)
    img.set_sform(None, code=0)
    path = tmp_path / "seg.nii.gz"
    nib.save(img, str(path))
    vol = load_labels(path)
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, labels)
    assert vol.spacing == pytest.approx((3.0, 0.7, 0.7))
    out = save_labels(vol.data, vol, tmp_path / "copy.nii.gz")
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 0)


@pytest.mark.parametrize(
    ("values", "dtype", "match"),
    [
        ([0, 1, 300], np.int16, "0 to 300"),
        ([0, -1, 2], np.int16, "-1 to 2"),
        ([0.0, 1.5, 2.0], np.float32, "non-integer"),
        ([0.0, np.nan, 2.0], np.float32, "NaN"),
    ],
)
def test_bad_label_values(tmp_path: Path, values: list[float], dtype: type, match: str) -> None:
    arr = np.zeros((3, 4, 5), dtype=dtype)
    arr.flat[: len(values)] = values
    path = _save(arr, np.eye(4), tmp_path / "bad.nii.gz")
    with pytest.raises(InvalidImageError, match=match):
        load_labels(path)


def test_integer_valued_float_labels_are_fine(tmp_path: Path) -> None:
    arr = np.zeros((3, 4, 5), dtype=np.float32)
    arr[1, 1, 1], arr[2, 2, 2] = 1.0, 2.0
    vol = load_labels(_save(arr, kits19_affine((1.0, 1.0, 1.0)), tmp_path / "f.nii.gz"))
    assert vol.data.dtype == np.uint8
    assert vol.data[1, 1, 1] == 1
    assert vol.data[2, 2, 2] == 2


# --------------------------------------------------------------------------------------------- saving


def test_save_labels_round_trip_keeps_layout_and_header(phantom_case, tmp_path: Path) -> None:
    ct = load_ct(phantom_case.ct_path)
    original = nib.load(phantom_case.ct_path)
    labels = phantom_case.labels.copy()
    out = save_labels(labels, ct, tmp_path / "out" / "pred.nii.gz")
    assert out == tmp_path / "out" / "pred.nii.gz"
    saved = nib.load(out)
    assert saved.shape == original.shape
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-6)
    for form in ("qform", "sform"):
        a, a_code = getattr(original.header, f"get_{form}")(coded=True)
        b, b_code = getattr(saved.header, f"get_{form}")(coded=True)
        assert int(a_code) == int(b_code)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-6)
    slope, inter = saved.header.get_slope_inter()
    assert slope in (None, 1.0)
    assert inter in (None, 0.0)
    # Stored array is the file's own layout: compare with the stored labels written by the phantom.
    np.testing.assert_array_equal(
        np.asanyarray(saved.dataobj), np.asanyarray(nib.load(phantom_case.labels_path).dataobj)
    )
    np.testing.assert_array_equal(load_labels(out).data, labels)
    assert list((tmp_path / "out").iterdir()) == [out]


def test_save_labels_stores_exactly_despite_scaled_input(tmp_path: Path) -> None:
    stored = np.full((6, 5, 4), 2024, dtype=np.int16)
    path = _save_raw(stored, np.diag([0.7, 0.8, 2.5, 1.0]), tmp_path / "ct.nii.gz", 2.0, -3048.0)
    vol = load_ct(path)
    np.testing.assert_allclose(vol.data, 1000.0)
    labels = np.zeros(vol.data.shape, np.uint8)
    labels[1, 2, 3] = 2
    labels[0, 1, 1] = 1
    out = save_labels(labels, vol, tmp_path / "labels.nii")
    raw = nib.load(out)
    assert raw.get_data_dtype() == np.uint8
    assert np.asanyarray(raw.dataobj).max() == 2
    np.testing.assert_array_equal(load_labels(out).data, labels)


def test_save_labels_accepts_bool_and_small_ints(kits19_case, tmp_path: Path) -> None:
    ct = load_ct(kits19_case.ct_path)
    save_labels(kits19_case.labels > 0, ct, tmp_path / "bool.nii.gz")
    save_labels(kits19_case.labels.astype(np.int64), ct, tmp_path / "int.nii.gz")
    np.testing.assert_array_equal(load_labels(tmp_path / "int.nii.gz").data, kits19_case.labels)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((24, 64, 63), np.uint8), "shape"),
        (np.zeros((64, 64, 24), np.uint8), "shape"),
        (np.full(PHANTOM_SHAPE, 0.5, np.float32), "integers"),
        (np.full(PHANTOM_SHAPE, 256, np.int32), "0..255"),
    ],
)
def test_save_labels_rejects_bad_arrays(kits19_case, tmp_path: Path, labels, match: str) -> None:
    ct = load_ct(kits19_case.ct_path)
    with pytest.raises(ValueError, match=match):
        save_labels(labels, ct, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


def test_save_onto_the_input_is_refused(phantom_case) -> None:
    ct = load_ct(phantom_case.ct_path)
    before = _sha(phantom_case.ct_path)
    with pytest.raises(OutputError, match="over the input"):
        save_labels(phantom_case.labels, ct, phantom_case.ct_path)
    # Same file reached through another spelling of the path.
    other = phantom_case.ct_path.parent / ".." / phantom_case.ct_path.parent.name / "imaging.nii.gz"
    with pytest.raises(OutputError):
        save_labels(phantom_case.labels, ct, other)
    assert _sha(phantom_case.ct_path) == before


def test_output_name_must_be_nifti(kits19_case, tmp_path: Path) -> None:
    ct = load_ct(kits19_case.ct_path)
    with pytest.raises(OutputError, match=r"\.nii"):
        save_labels(kits19_case.labels, ct, tmp_path / "labels.png")


@pytest.mark.parametrize(
    ("err", "match"),
    [(errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied"), (errno.EIO, "cannot write")],
)
def test_failed_write_leaves_nothing_behind(
    kits19_case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, match: str
) -> None:
    ct = load_ct(kits19_case.ct_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "pred.nii.gz"
    target.write_bytes(b"previous result")

    def failing_save(img, filename):
        Path(filename).write_bytes(b"partial")  # a half-written temporary file
        raise OSError(err, "simulated failure")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OutputError, match=match):
        save_labels(kits19_case.labels, ct, target)
    assert sorted(p.name for p in out_dir.iterdir()) == ["pred.nii.gz"]
    assert target.read_bytes() == b"previous result"


def test_save_overwrites_an_older_output(kits19_case, tmp_path: Path) -> None:
    ct = load_ct(kits19_case.ct_path)
    target = tmp_path / "pred.nii.gz"
    target.write_bytes(b"old")
    save_labels(kits19_case.labels, ct, target)
    np.testing.assert_array_equal(load_labels(target).data, kits19_case.labels)


def test_volume_from_frame_saves_kits19_style(tmp_path: Path) -> None:
    data = _ct_array((4, 5, 6))
    vol = Volume.from_frame(data, (2.0, 0.5, 0.6))
    out = save_labels((data > 0).astype(np.uint8), vol, tmp_path / "l.nii.gz")
    img = nib.load(out)
    assert img.shape == (4, 5, 6)
    assert nib.aff2axcodes(img.affine) == FRAME_AXCODES
    assert load_labels(out).spacing == pytest.approx((2.0, 0.5, 0.6))


# --------------------------------------------------------------------------------------------- folders


def test_find_nifti_sorted_and_filtered(tmp_path: Path) -> None:
    for name in ("b.nii.gz", "a.nii", "c.NII.GZ", ".hidden.nii.gz", "notes.txt", "x.nii.gz.part"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.nii.gz").mkdir()
    assert [p.name for p in find_nifti(tmp_path)] == ["a.nii", "b.nii.gz", "c.NII.GZ"]
    assert find_nifti(tmp_path / "sub.nii.gz") == []
    with pytest.raises(InputNotFoundError):
        find_nifti(tmp_path / "missing")
    with pytest.raises(InputNotFoundError):
        find_nifti(tmp_path / "a.nii")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("case_00042.nii.gz", "case_00042"),
        ("data/case_00042/segmentation.nii.gz", "case_00042"),
        ("case_00042/imaging.nii.gz", "case_00042"),
        ("/x/y/patient7.nii", "patient7"),
        ("scan.v2.nii.gz", "scan.v2"),
        ("imaging.nii.gz", "imaging"),
    ],
)
def test_case_name(path: str, name: str) -> None:
    assert case_name(path) == name


# --------------------------------------------------------------------------------------------- real data

_CASE0 = SHARED_DATA / "kits19-labels" / "case_00000.nii.gz"


@pytest.mark.shared_data
@pytest.mark.skipif(not _CASE0.is_file(), reason="../shared/data/kits19-labels is not available")
def test_real_kits19_labels_are_already_in_the_frame(tmp_path: Path) -> None:
    img = nib.load(_CASE0)
    raw = np.asanyarray(img.dataobj)
    vol = load_labels(_CASE0)
    assert vol.data.shape == raw.shape
    assert np.array_equal(vol.data, raw)  # (assert_array_equal is very slow on 160M voxels)
    assert vol.geometry.axcodes == FRAME_AXCODES
    # A RAS copy of a 60-slice slab (the whole case would take long to write): same frame array.
    slab = nib.Nifti1Image(raw, img.affine, img.header).slicer[250:310]
    canonical = nib.as_closest_canonical(slab)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    assert canonical.shape == (512, 512, 60)
    ras_path = tmp_path / "case_00000_ras.nii"
    nib.save(canonical, str(ras_path))
    slab_path = tmp_path / "case_00000_slab.nii"
    nib.save(slab, str(slab_path))
    ras = load_labels(ras_path)
    assert np.array_equal(ras.data, raw[250:310])
    assert same_grid(load_labels(slab_path), ras)


_REAL_CT = SHARED_DATA / "real-ct" / "example_ct.nii.gz"
_REAL_SEG = SHARED_DATA / "real-ct" / "example_ct_seg_v1_blob18e85b3.nii.gz"


@pytest.mark.shared_data
@pytest.mark.skipif(not _REAL_SEG.is_file(), reason="../shared/data/real-ct is not available")
def test_real_ras_ct_lands_in_the_radiological_frame() -> None:
    ct = load_ct(_REAL_CT)
    seg = load_labels(_REAL_SEG)  # TotalSegmentator labels: 2 = right kidney, 3 = left kidney
    assert ct.geometry.axcodes == ("R", "A", "S")
    assert ct.data.shape == (112, 101, 122)
    assert same_grid(ct, seg)
    assert ct.data.min() < -900  # air in HU
    rows, cols = seg.data.shape[1:]
    for label, right_side in ((2, True), (3, False)):
        _, r, c = np.nonzero(seg.data == label)
        assert r.mean() > rows / 2  # kidneys are posterior: rows run anterior -> posterior
        assert (c.mean() < cols / 2) == right_side  # columns run from the patient's right to left


# --------------------------------------------------------------------------------------------- int16 frame


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])  # streamed and nibabel paths
@pytest.mark.parametrize(
    ("stored", "slope", "inter", "int16"),
    [
        (np.int16, np.nan, np.nan, True),  # no scaling in the header
        (np.int16, 1.0, -1024.0, True),  # the common CT intercept
        (np.uint8, 1.0, -100.0, True),
        (np.int8, 1.0, 0.0, True),
        (np.int16, 1.0, 0.5, False),  # fractional intercept: not integers any more
        (np.int16, 2.0, 0.0, False),  # a slope
        (np.uint16, 1.0, -1024.0, False),  # 0..65535 does not fit int16
        (np.float32, 1.0, 0.0, False),
    ],
)
def test_keep_int16_gives_the_same_hu_in_half_the_memory(
    tmp_path: Path, suffix: str, stored: type, slope: float, inter: float, int16: bool
) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(stored) if np.dtype(stored).kind in "iu" else None
    lo, hi = (max(info.min, -2000), min(info.max, 3000)) if info else (-1000, 2000)
    arr = rng.integers(lo, hi, size=(9, 8, 7)).astype(stored)
    path = _save_raw(arr, np.diag([0.8, 0.8, 2.5, 1.0]), tmp_path / f"ct{suffix}", slope=slope, inter=inter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VolumeWarning)  # some ranges do not look like HU; not tested here
        plain = load_ct(path)
        kept = load_ct(path, keep_int16=True)
    assert plain.data.dtype == np.float32
    assert kept.data.dtype == (np.int16 if int16 else np.float32)
    np.testing.assert_array_equal(kept.data.astype(np.float32), plain.data)


def test_keep_int16_falls_back_to_float_when_the_intercept_overflows(tmp_path: Path) -> None:
    arr = np.array([-5, 0, 32000], dtype=np.int16).reshape(1, 1, 3)
    path = _save_raw(arr, np.eye(4), tmp_path / "ct.nii.gz", slope=1.0, inter=1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VolumeWarning)
        vol = load_ct(path, keep_int16=True)
    assert vol.data.dtype == np.float32
    assert vol.data.max() == 33000.0
