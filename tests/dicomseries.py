"""Synthetic DICOM CT series for tests, written with pydicom from a frame array.

The frame ``(z, row, col)`` (axis codes I, P, L) maps onto plain axial DICOM slices: orientation
``[1, 0, 0, 0, 1, 0]`` (columns run to the patient's left, rows to posterior), so a slice's pixel array is
the frame slice itself; frame slice ``k`` lies at ``z = -k * dz`` (LPS), so slice 0 is the most superior
and its position is the origin. The volume read back must then equal the frame, with the KiTS19 affine of
the spacing (:func:`kitsseg.io.frame.kits19_affine`). Files are named in a shuffled order, without suffix,
and InstanceNumber runs backwards, so nothing but the positions can give the right order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # CI installs it (the test extra); a fallback only

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402


def write_series(
    folder: Path,
    frame_hu: np.ndarray,
    spacing: Sequence[float],
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    positions: Sequence[float] | None = None,
    tilt_mm: float = 0.0,
    drop: Sequence[int] = (),
    frame_of_reference: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write ``frame_hu`` as one DICOM file per slice into ``folder``; returns the paths (slice order).

    ``positions``: z (LPS, mm) of each frame slice instead of ``-k * dz``; ``tilt_mm``: sideways (y) shift
    per slice, as a gantry tilt gives; ``drop``: frame slices left out (missing slices).
    """
    folder.mkdir(parents=True, exist_ok=True)
    dz, dr, dc = (float(s) for s in spacing)
    n = frame_hu.shape[0]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    zs = [-k * dz for k in range(n)] if positions is None else [float(z) for z in positions]
    order = np.random.default_rng(seed).permutation(n)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    paths = []
    for k in range(n):
        if k in drop:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientName = "Phantom^Kitsseg"
        ds.PatientID = "PHANTOM"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 3
        ds.InstanceNumber = n - k
        ds.Manufacturer = "kitsseg tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, k * tilt_mm, zs[k]]
        ds.PixelSpacing = [dr, dc]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = frame_hu.shape[1], frame_hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        stored = np.round((np.asarray(frame_hu[k], dtype=np.float64) - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{order[k]:04d}"
        _save(ds, path)
        paths.append(path)
    return paths


def _save(ds: Dataset, path: Path) -> None:
    try:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


def stored_hu(frame_hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """The HU a reader gets back from :func:`write_series` (values rounded to stored integers)."""
    stored = np.round((np.asarray(frame_hu, dtype=np.float64) - intercept) / slope).astype(np.int16)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)
