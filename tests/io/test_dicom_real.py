"""The real DICOM series ``../shared/data/real-ct/ircad_01/dicom`` against its NIfTI conversion ``ct.nii.gz``.

``ct.nii.gz`` was converted from the same files with SimpleITK. Read by kitsseg, the series must give
the same frame voxels on the same physical grid, its stored layout and affine must be SimpleITK's, and a
mask or a DICOM-SEG written for it must land on the right slices. Skipped where the data is absent.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomseries import pydicom
from kitsseg.inference.segment import load_model, segment
from kitsseg.io.dicom import DicomVolume
from kitsseg.io.dicom_seg import write_dicom_seg
from kitsseg.io.frame import same_grid
from kitsseg.io.load import load_ct, load_labels
from kitsseg.io.save import save_labels
from oracle import write_oracle_weights

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
IRCAD = SHARED_DATA / "real-ct" / "ircad_01"
SERIES = IRCAD / "dicom"
CT = IRCAD / "ct.nii.gz"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(
        not (SERIES.is_dir() and CT.is_file()), reason="../shared/data/real-ct/ircad_01 is absent"
    ),
]


@pytest.fixture(scope="module")
def series() -> DicomVolume:
    vol = load_ct(SERIES, keep_int16=True)
    assert isinstance(vol, DicomVolume)
    return vol


def test_series_matches_its_simpleitk_conversion(series: DicomVolume) -> None:
    nifti = load_ct(CT, keep_int16=True)
    assert series.data.shape == nifti.data.shape == (129, 512, 512)
    assert np.array_equal(series.data, nifti.data)
    assert same_grid(series, nifti)
    np.testing.assert_allclose(series.frame_affine, nifti.frame_affine, atol=1e-5)
    img = nib.load(str(CT))
    assert series.geometry.shape == img.shape  # (column, row, slice), as SimpleITK stores it
    np.testing.assert_allclose(series.geometry.affine, img.affine, atol=1e-5)


def test_mask_has_the_geometry_of_the_conversion(tmp_path: Path, series: DicomVolume) -> None:
    labels = np.zeros(series.data.shape, np.uint8)
    labels[60:70, 300:340, 100:150] = 1
    out = save_labels(labels, series, tmp_path / "mask.nii.gz")
    mask, ct = nib.load(str(out)), nib.load(str(CT))
    assert mask.shape == ct.shape
    np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-5)
    assert int(mask.header["intent_code"]) == 1002
    assert np.array_equal(load_labels(out).data, labels)


def test_seg_frames_land_on_the_right_slices(tmp_path: Path, series: DicomVolume) -> None:
    labels = np.zeros(series.data.shape, np.uint8)
    labels[20:30, 300:340, 100:150] = 1  # frame slices 20..29 (counted from the top: superior)
    labels[24:26, 310:320, 110:120] = 2
    notes = write_dicom_seg(labels, series, tmp_path / "seg.dcm")
    assert any("FrameOfReferenceUID" in n for n in notes)  # this export has none
    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series.series_uid
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.series.headers}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), 512, 512)
    found = set()
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z_source = float(by_uid[uid].ImagePositionPatient[2])
        # The frame slice at that height (world z of frame slice k from the frame affine; z is S in RAS).
        k = int(round((z_source - series.frame_affine[2, 3]) / series.frame_affine[2, 0]))
        np.testing.assert_array_equal(frame.astype(bool), labels[k] == number)
        found.add((k, number))
    assert found == {(k, 1) for k in range(20, 30)} | {(k, 2) for k in (24, 25)}


@pytest.mark.slow
def test_series_segments_like_its_conversion(tmp_path: Path) -> None:
    model = load_model(write_oracle_weights(tmp_path / "oracle.pt"), device="cpu", threads=1)
    a = segment(SERIES, tmp_path / "dicom.nii.gz", weights=model)
    b = segment(CT, tmp_path / "nifti.nii.gz", weights=model)
    ia, ib = nib.load(str(a.output_path)), nib.load(str(b.output_path))
    np.testing.assert_allclose(ia.affine, ib.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj))
    assert a.report["kidney_tumor_volume_ml"] == b.report["kidney_tumor_volume_ml"] > 0
