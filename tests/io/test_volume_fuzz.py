"""Fuzz load_ct with random headers, shapes, dtypes and damaged files.

Whatever the file, ``load_ct`` must return a Volume or raise a KitssegError (which the CLI turns into one
red line); any other exception would reach the user as a traceback.
"""

from __future__ import annotations

import gzip
import math
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kitsseg.errors import KitssegError
from kitsseg.io import load as loader
from kitsseg.io.frame import Volume
from kitsseg.io.load import load_ct

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64, np.complex64]
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 1.0, -1.0])


def _sometimes(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws (hypothesis booleans are 50/50; most files should be sane)."""
    return draw(st.integers(1, one_in)) == 1


@st.composite
def nifti_files(draw: st.DrawFn) -> tuple[bytes, str]:
    """Bytes of a NIfTI-1 file built by hand, so any header value can appear, and its suffix.

    About half the files are well formed (3D or singleton 4D, sane affine); the rest have odd shapes,
    dtypes, affines, spacings, scaling, offsets, flipped bytes or cut-off ends.
    """
    ndim = draw(st.sampled_from([3, 3, 3, 3, 4, 4, 2, 5, 1]))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    if _sometimes(draw, 8):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    if _sometimes(draw, 8):  # a huge declared size (memory check, truncated data)
        dims = header["dim"].copy()
        dims[1 : 1 + ndim] = draw(st.lists(st.integers(-2, 32767), min_size=ndim, max_size=ndim))
        header["dim"] = dims
    # A rotation (often a signed axis permutation) with random spacing, or any 12 numbers at all.
    if _sometimes(draw, 4):
        affine = np.eye(4)
        affine[:3, :4] = np.array(draw(st.lists(FLOATS, min_size=12, max_size=12))).reshape(3, 4)
    else:
        if draw(st.booleans()):
            q = np.eye(3)[draw(st.permutations([0, 1, 2]))] * draw(
                st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3)
            )
        else:
            q, _ = np.linalg.qr(
                np.array(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))).reshape(3, 3)
            )
        spacing = draw(st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3))
        affine = np.eye(4)
        affine[:3, :3] = q @ np.diag(spacing)
        affine[:3, 3] = draw(st.lists(st.floats(-500, 500), min_size=3, max_size=3))
        header["pixdim"][1:4] = spacing
    header["sform_code"] = draw(st.sampled_from([1, 2, 0, 3, 4, 7]))
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["qform_code"] = draw(st.sampled_from([0, 1, 2, 9]))
    if _sometimes(draw, 4):
        header["quatern_b"], header["quatern_c"], header["quatern_d"] = draw(
            st.lists(FLOATS, min_size=3, max_size=3)
        )
        header["pixdim"][1:4] = draw(st.lists(FLOATS, min_size=3, max_size=3))
        header["pixdim"][0] = draw(st.sampled_from([1.0, -1.0, 0.0, 2.0]))
    if _sometimes(draw, 3):
        header["scl_slope"], header["scl_inter"] = draw(st.lists(FLOATS, min_size=2, max_size=2))
    header["vox_offset"] = 352 if not _sometimes(draw, 6) else draw(st.sampled_from([0, 16, 1000]))
    n = math.prod(int(d) for d in header["dim"][1 : 1 + ndim])
    n_data = max(0, min(n, 4096)) * dtype.itemsize
    data = draw(st.binary(min_size=n_data, max_size=n_data)) if n_data <= 512 else bytes(n_data)
    blob = bytearray(header.binaryblock + b"\0\0\0\0" + data)
    if _sometimes(draw, 5):  # damage: flip some bytes
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    if _sometimes(draw, 6):  # or cut the file short
        blob = blob[: draw(st.integers(0, len(blob)))]
    suffix = draw(st.sampled_from([".nii", ".nii.gz"]))
    raw = bytes(blob)
    if suffix == ".nii.gz":
        raw = gzip.compress(raw)
        if _sometimes(draw, 6):
            raw = raw[: draw(st.integers(0, len(raw)))]
    return raw, suffix


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nifti_files(), st.sampled_from([None, 0, 1]))
def test_load_ct_returns_a_volume_or_raises_a_kitsseg_error(
    file: tuple[bytes, str], volume_index: int | None
) -> None:
    raw, suffix = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(raw)
        # 64 MiB "available": a huge declared size must fail fast, not allocate gigabytes.
        with mock.patch.object(loader, "_available_memory", return_value=64 * 2**20):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    result = load_ct(path, volume_index=volume_index)
                except KitssegError:
                    return
        assert isinstance(result, Volume)
        assert result.data.ndim == 3
        assert result.data.dtype == np.float32
        assert np.all(np.isfinite(result.data))
        assert all(np.isfinite(s) and s > 0 for s in result.spacing)
        assert path.read_bytes() == raw  # never modified
