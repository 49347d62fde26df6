"""The streaming gzip reader gives exactly what nibabel gives, for every layout, dtype and piece size."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation

from kitsseg.errors import InvalidImageError
from kitsseg.io import niftistream
from kitsseg.io.frame import LAYOUT_AXCODES, _geometry
from kitsseg.io.load import load_ct
from kitsseg.io.save import write_frame


def _frame_by_nibabel(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    geometry = _geometry(img, path, None)
    return np.ascontiguousarray(apply_orientation(img.get_fdata(dtype=np.float32), geometry.ornt))


@pytest.mark.parametrize("layout", sorted(LAYOUT_AXCODES))
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("piece", [1, 3 * 1024, 8 << 20])
def test_stream_equals_nibabel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, dtype: type, piece: int
) -> None:
    # Piece sizes: smaller than one plane, a few planes, the whole volume; an odd shape per axis.
    monkeypatch.setattr(niftistream, "_PIECE_BYTES", piece)
    monkeypatch.setattr(niftistream, "_READ_BYTES", 997)
    rng = np.random.default_rng(3)
    lo, hi = (0, 255) if dtype == np.uint8 else (-1000, 1500)
    frame = rng.integers(lo, hi, size=(13, 17, 11)).astype(dtype)
    path = write_frame(frame, tmp_path / f"ct_{layout}.nii.gz", spacing=(2.0, 0.8, 0.7), layout=layout)
    img = nib.load(str(path))
    assert niftistream.can_stream(img, path)
    calls = []
    real = niftistream.read_into_frame

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(niftistream, "read_into_frame", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uint8 "HU" in 0..255 may draw the not-HU warning: not tested here
        got = load_ct(path).data
    assert calls, "load_ct did not take the streaming path"
    np.testing.assert_array_equal(got, _frame_by_nibabel(path))
    np.testing.assert_array_equal(got, frame.astype(np.float32))


def test_scaled_and_multi_member_gzip(tmp_path: Path) -> None:
    # scl_slope/inter applied after streaming; a file of two concatenated gzip members (as pigz and
    # bgzip can write) reads whole.
    rng = np.random.default_rng(5)
    stored = rng.integers(0, 4000, size=(9, 8, 7)).astype(np.int16)
    img = nib.Nifti1Image(stored, np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(0.5, -1024.0)
    plain = tmp_path / "ct.nii"
    nib.save(img, str(plain))
    blob = plain.read_bytes()
    path = tmp_path / "ct.nii.gz"
    cut = len(blob) // 3
    path.write_bytes(gzip.compress(blob[:cut]) + gzip.compress(blob[cut:]))
    got = load_ct(path).data
    np.testing.assert_allclose(got, _frame_by_nibabel(path))
    assert got.min() >= -1024.0
    assert got.max() <= 0.5 * 4000 - 1024.0


def test_truncated_stream_is_one_clear_error(tmp_path: Path) -> None:
    frame = np.random.default_rng(0).integers(-1000, 1000, size=(40, 64, 64)).astype(np.int16)
    path = write_frame(frame, tmp_path / "full.nii.gz", spacing=(1.0, 1.0, 1.0))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(InvalidImageError, match="not a readable NIfTI"):
        load_ct(cut)


@pytest.mark.parametrize("dtype", [">i2", ">f4"])
def test_big_endian_storage(tmp_path: Path, dtype: str) -> None:
    arr = np.random.default_rng(7).integers(-1000, 1000, size=(9, 8, 7)).astype(dtype)
    img = nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.0, 1.0]), header=nib.Nifti1Header(endianness=">"))
    img.set_data_dtype(np.dtype(dtype))
    path = tmp_path / "be.nii.gz"
    nib.save(img, str(path))
    assert nib.load(str(path)).get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(load_ct(path).data, _frame_by_nibabel(path))
