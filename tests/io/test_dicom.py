"""DICOM series input (kitsseg.io.dicom): synthetic series built with pydicom, and every refusal.

A series read back must equal the frame it was written from, on the KiTS19 affine of its spacing, and on
the same physical grid as the NIfTI conversion of the same voxels; anything that cannot be stacked exactly
(uneven spacing, gantry tilt, two series, not CT, missing or duplicate slices) is one clear error line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomseries import stored_hu, write_series
from kitsseg.errors import InvalidImageError
from kitsseg.evaluation.phantom import make_phantom
from kitsseg.io.dicom import (
    DicomSeriesError,
    DicomVolume,
    MissingExtraError,
    holds_dicom_series,
    read_series,
    stored_shape,
)
from kitsseg.io.frame import kits19_affine, same_grid
from kitsseg.io.load import load_ct, load_labels
from kitsseg.io.save import save_labels, write_frame

SHAPE = (12, 40, 48)
SPACING = (2.5, 0.8, 0.7)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    ct, _ = make_phantom(SHAPE, SPACING, seed=11, noise_hu=1.0)
    return ct


def test_series_loads_in_the_frame_sorted_by_position(tmp_path: Path, frame: np.ndarray) -> None:
    # File names are shuffled and InstanceNumber runs backwards: only the positions give the order.
    paths = write_series(tmp_path / "series", frame, SPACING)
    assert sorted(p.name for p in paths) != [p.name for p in paths]
    vol = load_ct(tmp_path / "series", keep_int16=True)
    assert isinstance(vol, DicomVolume)
    assert vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data, stored_hu(frame))
    assert vol.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(vol.frame_affine, kits19_affine(SPACING), atol=1e-5)
    # Stored as SimpleITK/dcm2niix write a series: (column, row, slice), slices going superior, LPS.
    assert vol.geometry.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert vol.geometry.axcodes == ("L", "P", "S")
    assert int(vol.geometry.header["qform_code"]) == int(vol.geometry.header["sform_code"]) == 1
    assert stored_shape(tmp_path / "series") == vol.geometry.shape
    assert load_ct(tmp_path / "series").data.dtype == np.float32


def test_slope_and_intercept_give_hu(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING, slope=0.5, intercept=-1000.0)
    vol = load_ct(tmp_path / "s", keep_int16=True)
    assert vol.data.dtype == np.float32  # slope 0.5: not integral HU
    np.testing.assert_allclose(vol.data, stored_hu(frame, 0.5, -1000.0))
    assert abs(float(vol.data.min()) - float(frame.min())) <= 0.25


def test_same_grid_and_voxels_as_the_nifti_conversion(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING)
    hu = stored_hu(frame).astype(np.int16)
    nifti = write_frame(hu, tmp_path / "ct.nii.gz", spacing=SPACING, layout="lps")
    from_dicom, from_nifti = load_ct(tmp_path / "s"), load_ct(nifti)
    np.testing.assert_array_equal(from_dicom.data, from_nifti.data)
    assert same_grid(from_dicom, from_nifti)
    # A mask saved for the series has the geometry a converter gives the series.
    labels = (from_dicom.data > 100).astype(np.uint8)
    out = save_labels(labels, from_dicom, tmp_path / "mask.nii.gz")
    img = nib.load(str(out))
    assert img.shape == nib.load(str(nifti)).shape
    np.testing.assert_allclose(img.affine, nib.load(str(nifti)).affine, atol=1e-5)
    np.testing.assert_array_equal(load_labels(out).data, labels)


def test_non_dicom_files_are_ignored(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING)
    (tmp_path / "s" / "README.txt").write_text("exported from PACS\n")
    (tmp_path / "s" / "notes").write_bytes(b"no preamble here" * 20)
    assert holds_dicom_series(tmp_path / "s")
    assert not holds_dicom_series(tmp_path)  # the parent holds a series folder, not DICOM files
    assert len(read_series(tmp_path / "s").files) == SHAPE[0]


def _err(folder: Path) -> str:
    with pytest.raises(DicomSeriesError) as info:
        load_ct(folder)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, InvalidImageError)  # exit code 4, like any unusable image
    return message


def test_uneven_spacing_is_refused(tmp_path: Path, frame: np.ndarray) -> None:
    zs = [-k * 2.5 for k in range(SHAPE[0])]
    zs[5] -= 0.6  # one slice 0.6 mm out of place (a quarter of the spacing)
    write_series(tmp_path / "s", frame, SPACING, positions=zs)
    message = _err(tmp_path / "s")
    assert "unevenly spaced" in message
    assert "resample" in message


def test_rounded_positions_within_tolerance_are_accepted(tmp_path: Path, frame: np.ndarray) -> None:
    zs = [round(-k * 2.5 + (0.004 if k % 2 else -0.004), 3) for k in range(SHAPE[0])]
    write_series(tmp_path / "s", frame, SPACING, positions=zs)
    assert load_ct(tmp_path / "s").spacing[0] == pytest.approx(2.5, abs=1e-3)


def test_gantry_tilt_is_refused(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING, tilt_mm=2.5 * np.tan(np.radians(15)))
    message = _err(tmp_path / "s")
    assert "gantry tilt of about 15.0 degrees" in message
    assert "dcm2niix" in message


def test_two_series_are_refused(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING)
    write_series(tmp_path / "s", frame[:4], SPACING, seed=5)
    message = _err(tmp_path / "s")
    assert "holds 2 DICOM series" in message
    assert "its own folder" in message


def test_mr_series_is_refused(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING, modality="MR")
    message = _err(tmp_path / "s")
    assert "holds a MR series" in message
    assert "CT only" in message


def test_missing_slices_are_refused(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING, drop=(6, 7))
    message = _err(tmp_path / "s")
    assert "about 2 slice(s) are missing" in message
    assert "7.500 mm apart" in message


def test_duplicate_position_is_refused(tmp_path: Path, frame: np.ndarray) -> None:
    zs = [-k * 2.5 for k in range(SHAPE[0])]
    zs[4] = zs[3]
    write_series(tmp_path / "s", frame, SPACING, positions=zs)
    assert "same slice position" in _err(tmp_path / "s")


def test_single_slice_is_refused(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame[:1], SPACING)
    assert "single slice" in _err(tmp_path / "s")


@pytest.mark.parametrize(("keep", "expected"), [(300, "no SeriesInstanceUID"), (-100, "pixel data")])
def test_truncated_file_is_named(tmp_path: Path, frame: np.ndarray, keep: int, expected: str) -> None:
    paths = write_series(tmp_path / "s", frame, SPACING)
    paths[3].write_bytes(paths[3].read_bytes()[:keep])
    message = _err(tmp_path / "s")
    assert paths[3].name in message
    assert expected in message


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("ImageOrientationPatient", ["nan", 0, 0, 0, 1, 0], "is not two perpendicular unit vectors"),
        ("ImageOrientationPatient", [0, 0, 0, 0, 0, 0], "[0.0, 0.0, 0.0, 0.0, 0.0, 0.0] is not two"),
        ("ImagePositionPatient", [0, "nan", 0], "non-finite ImagePositionPatient"),
    ],
)
def test_non_finite_or_degenerate_geometry_is_refused(
    tmp_path: Path, frame: np.ndarray, keyword: str, value: list, expected: str
) -> None:
    """NaN compares False with every tolerance, so a NaN orientation passed the unit-vector check and
    ended in a traceback from nibabel's qform; each is now one line naming the header (and numbers print
    as numbers, not ``np.float64(0.0)``)."""
    import warnings

    pydicom = pytest.importorskip("pydicom")
    for path in write_series(tmp_path / "s", frame, SPACING):
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():  # pydicom warns that "nan" is not a valid DS value; it is the point
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value)
            ds.save_as(path)
    message = _err(tmp_path / "s")
    assert expected in message
    assert "np.float64" not in message


def test_volume_index_with_a_series_is_refused(tmp_path: Path, frame: np.ndarray) -> None:
    write_series(tmp_path / "s", frame, SPACING)
    with pytest.raises(InvalidImageError, match="is a DICOM series"):
        load_ct(tmp_path / "s", volume_index=2)


def test_without_pydicom_one_line_names_the_extra(
    tmp_path: Path, frame: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path / "s", frame, SPACING)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(MissingExtraError) as info:
        load_ct(tmp_path / "s")
    assert 'pip install "kitsseg[dicom]"' in str(info.value)
    assert "\n" not in str(info.value)
