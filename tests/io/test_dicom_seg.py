"""DICOM series end to end, and DICOM-SEG output (kitsseg.io.dicom_seg), on synthetic series.

With the oracle weights (oracle.py) a DICOM series must segment to exactly the labels of its NIfTI
conversion, on the same physical grid; ``-o x.dcm`` must give a SEG that pydicom reads back with one
segment per label (SNOMED CT codes), referencing the source series, each frame on its source slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomseries import pydicom, stored_hu, write_series
from kitsseg.cli import main
from kitsseg.errors import InvalidImageError, OutputError
from kitsseg.evaluation.phantom import make_phantom
from kitsseg.inference.segment import load_model, segment
from kitsseg.io.dicom_seg import write_dicom_seg
from kitsseg.io.frame import Volume
from kitsseg.io.labeltable import table_paths
from kitsseg.io.load import load_ct, load_labels
from kitsseg.io.save import write_frame
from oracle import write_oracle_weights

SHAPE = (16, 64, 64)
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


@pytest.fixture(scope="module")
def model(weights: Path):
    return load_model(weights, device="cpu", threads=1)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path], np.ndarray]:
    """``(series folder, NIfTI conversion, series files in frame order, true labels)``."""
    root = tmp_path_factory.mktemp("case")
    ct, truth = make_phantom(SHAPE, SPACING, seed=4, noise_hu=1.0)
    files = write_series(root / "series", ct, SPACING)
    nifti = write_frame(stored_hu(ct).astype(np.int16), root / "ct.nii.gz", spacing=SPACING, layout="lps")
    return root / "series", nifti, files, truth


def test_series_segments_like_its_nifti_conversion(tmp_path: Path, model, case) -> None:
    series, nifti, _, truth = case
    from_dicom = segment(series, tmp_path / "dicom.nii.gz", weights=model)
    from_nifti = segment(nifti, tmp_path / "nifti.nii.gz", weights=model)
    a, b = nib.load(str(from_dicom.output_path)), nib.load(str(from_nifti.output_path))
    assert a.shape == b.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_array_equal(load_labels(from_dicom.output_path).data, truth)
    assert set(np.unique(truth)) == {0, 1, 2}
    assert all(p.is_file() for p in table_paths(from_dicom.output_path))
    report = json.loads(from_dicom.report_path.read_text())
    assert report["input"] == str(series)
    assert report["hu_stats"] == from_nifti.report["hu_stats"]


def _frames_by_source(seg) -> dict[str, dict[int, np.ndarray]]:
    """``{source SOP Instance UID: {segment number: frame}}`` of a read-back SEG."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out: dict[str, dict[int, np.ndarray]] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out.setdefault(str(uid), {})[number] = frame
    return out


def test_seg_output_reads_back_on_the_right_slices(tmp_path: Path, model, case) -> None:
    series, _, files, truth = case
    result = segment(series, tmp_path / "out" / "mask.dcm", weights=model)
    assert result.report_path == tmp_path / "out" / "mask.json"
    seg = pydicom.dcmread(str(result.output_path))
    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    source = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]  # frame slice order
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2)] == ["kidney", "tumor"]
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    frames = _frames_by_source(seg)
    uid_to_slice = {str(ds.SOPInstanceUID): k for k, ds in enumerate(source)}
    seen = set()
    for uid, by_segment in frames.items():
        k = uid_to_slice[uid]
        for number, frame in by_segment.items():
            np.testing.assert_array_equal(frame.astype(bool), truth[k] == number, err_msg=f"slice {k}")
            seen.add((k, number))
    expected = {(k, n) for k in range(SHAPE[0]) for n in (1, 2) if np.any(truth[k] == n)}
    assert seen == expected  # every non-empty (slice, segment) and nothing else
    positions = {
        str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID): [
            float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient
        ]
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    for uid, position in positions.items():
        expected_position = [float(v) for v in source[uid_to_slice[uid]].ImagePositionPatient]
        np.testing.assert_allclose(position, expected_position)


def test_empty_mask_gives_a_seg_with_both_segments(tmp_path: Path, case) -> None:
    series = case[0]
    volume = load_ct(series)
    notes = write_dicom_seg(np.zeros(volume.data.shape, np.uint8), volume, tmp_path / "empty.dcm")
    assert notes == []  # the series has a Frame of Reference
    seg = pydicom.dcmread(str(tmp_path / "empty.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["kidney", "tumor"]
    assert not seg.pixel_array.any()


def test_series_without_frame_of_reference_gets_a_stable_one(tmp_path: Path) -> None:
    ct, _ = make_phantom((4, 32, 32), SPACING, seed=1)
    write_series(tmp_path / "s", ct, SPACING, frame_of_reference=False)
    volume = load_ct(tmp_path / "s")
    labels = np.zeros(volume.data.shape, np.uint8)
    labels[1, 10:20, 10:20] = 1
    uids = []
    for name in ("a.dcm", "b.dcm"):
        notes = write_dicom_seg(labels, volume, tmp_path / name)
        assert len(notes) == 1
        assert "FrameOfReferenceUID" in notes[0]
        uids.append(pydicom.dcmread(str(tmp_path / name)).FrameOfReferenceUID)
    assert uids[0] == uids[1]


def test_seg_needs_a_dicom_volume(tmp_path: Path) -> None:
    volume = Volume.from_frame(np.zeros((3, 8, 8), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(InvalidImageError, match="input was not DICOM"):
        write_dicom_seg(np.zeros((3, 8, 8), np.uint8), volume, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_seg_from_nifti_input_is_refused_before_any_work(tmp_path: Path, weights: Path, case) -> None:
    nifti = case[1]
    with pytest.raises(OutputError, match="not a DICOM series") as info:
        segment(nifti, tmp_path / "out" / "mask.dcm", weights=weights, device="cpu", threads=1)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_output_inside_the_series_folder_is_refused(tmp_path: Path, weights: Path, case) -> None:
    series = case[0]
    before = sorted(p.name for p in series.iterdir())
    with pytest.raises(OutputError, match="input DICOM folder"):
        segment(series, series / "mask.nii.gz", weights=weights, device="cpu", threads=1)
    assert sorted(p.name for p in series.iterdir()) == before


def _cli(args: list[object], weights: Path) -> int:
    argv = ["segment", *map(str, args), "--weights", str(weights), "--device", "cpu", "--threads", "1"]
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_series_folder_is_one_case(tmp_path: Path, weights: Path, case, capsys) -> None:
    series = case[0]
    assert _cli([series, "-o", tmp_path / "mask.dcm"], weights) == 0
    assert pydicom.dcmread(str(tmp_path / "mask.dcm")).Modality == "SEG"
    assert (tmp_path / "mask.json").is_file()
    capsys.readouterr()
    tilted = tmp_path / "tilted"
    ct, _ = make_phantom((6, 32, 32), SPACING, seed=2)
    write_series(tilted, ct, SPACING, tilt_mm=0.5)
    assert _cli([tilted, "-o", tmp_path / "t.nii.gz"], weights) == InvalidImageError.exit_code
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert "gantry tilt" in err
    assert "Traceback" not in err
    assert not (tmp_path / "t.nii.gz").exists()
