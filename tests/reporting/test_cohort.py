"""The cohort table ``cases.csv`` (kitsseg.reporting.cohort), the HU statistics behind it, folder discovery.

``cases.csv`` must list every case with outputs after all parts of a job array, be rebuilt by
``--continue``, and agree with the per-case reports; ``segment`` must find KiTS case folders and DICOM
series subfolders as cases.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from kitsseg.evaluation.phantom import make_phantom
from kitsseg.inference.batch import segment_folder
from kitsseg.inference.segment import load_model
from kitsseg.io.inputs import find_case_inputs
from kitsseg.io.load import load_labels
from kitsseg.io.save import write_frame
from kitsseg.reporting.cohort import COHORT_FILE, COLUMNS, cohort_rows, write_cohort_table
from kitsseg.reporting.report import hu_statistics
from oracle import write_oracle_weights

SHAPE = (12, 48, 48)
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(
        write_oracle_weights(tmp_path_factory.mktemp("w") / "oracle.pt"), device="cpu", threads=1
    )


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        ct, _ = make_phantom(SHAPE, SPACING, seed=i, noise_hu=1.0)
        write_frame(ct, root / f"case_{i:02d}.nii.gz", spacing=SPACING, layout="ras")
    return root


# ----------------------------------------------------------------------------------------------- HU stats


def test_hu_statistics_per_label() -> None:
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 50, size=(6, 20, 20)).astype(np.float32)
    labels = np.zeros(ct.shape, np.uint8)
    labels[1:4, 5:12, 5:12] = 1
    labels[2, 7:9, 7:9] = 2
    stats = hu_statistics(ct, labels)
    for name, value in (("kidney", 1), ("tumor", 2)):
        hu = ct[labels == value].astype(np.float64)
        assert stats[name]["voxels"] == hu.size
        assert stats[name]["mean"] == pytest.approx(hu.mean())
        assert stats[name]["median"] == pytest.approx(np.median(hu))
        assert stats[name]["std"] == pytest.approx(hu.std())
        assert stats[name]["p5"] == pytest.approx(np.percentile(hu, 5))
        assert stats[name]["p95"] == pytest.approx(np.percentile(hu, 95))
    assert stats["kidney"]["voxels"] == 3 * 7 * 7 - 4


def test_hu_statistics_of_an_empty_region_are_none() -> None:
    stats = hu_statistics(np.zeros((2, 4, 4), np.int16), np.zeros((2, 4, 4), np.uint8))
    assert stats["tumor"] == {"voxels": 0, "mean": None, "median": None, "std": None, "p5": None, "p95": None}


# ----------------------------------------------------------------------------------------------- table


def test_two_job_array_parts_then_continue_list_every_case(tmp_path: Path, model) -> None:
    src, out = _folder(tmp_path / "in", 4), tmp_path / "out"
    first = segment_folder(src, out, weights=model, num_parts=2, part_id=0)
    assert first.cohort_path == out / COHORT_FILE
    assert [r["case"] for r in _read(out / COHORT_FILE)] == ["case_00", "case_02"]
    segment_folder(src, out, weights=model, num_parts=2, part_id=1)
    rows = _read(out / COHORT_FILE)
    assert [r["case"] for r in rows] == ["case_00", "case_01", "case_02", "case_03"]
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        report = json.loads((out / f"{row['case']}.json").read_text())
        assert row["status"] == "done"
        assert row["mask"] == f"{row['case']}.nii.gz"
        assert float(row["right_kidney_ml"]) == pytest.approx(report["kidney_volume_ml"]["right"], abs=1e-3)
        assert float(row["left_kidney_ml"]) == pytest.approx(report["kidney_volume_ml"]["left"], abs=1e-3)
        assert int(row["tumor_count"]) == report["tumor_count"]
        assert float(row["kidney_hu_median"]) == pytest.approx(
            report["hu_stats"]["kidney"]["median"], abs=0.01
        )
        assert row["weights_name"] == "oracle"
        assert len(row["weights_sha256"]) == 64
        assert row["kitsseg_version"] == report["kitsseg_version"]
        # The report's statistics are those of the CT under the mask.
        labels = load_labels(out / row["mask"]).data
        from kitsseg.io.load import load_ct

        ct = load_ct(src / row["mask"]).data
        assert report["hu_stats"]["kidney"]["mean"] == pytest.approx(float(ct[labels == 1].mean()), abs=1e-3)
    assert float(rows[0]["kidney_hu_mean"]) > 100  # phantom kidneys are enhanced (150-200 HU)
    # --continue skips everything and still rewrites the table; a case whose mask is gone drops out.
    (out / "case_03.nii.gz").unlink()
    (out / COHORT_FILE).write_text("stale\n")
    again = segment_folder(src, out, weights=model, continue_=True)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped", "skipped", "done"]
    assert [r["case"] for r in _read(out / COHORT_FILE)] == ["case_00", "case_01", "case_02", "case_03"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no lock or temporary left


def test_rows_ignore_other_json_and_cases_without_mask(tmp_path: Path) -> None:
    report = {
        "format": "kitsseg-report/1",
        "input": "/data/a.nii.gz",
        "output": "/elsewhere/a.nii.gz",  # only the file name counts: the folder may have moved
        "kidney_volume_ml": {"right": 150.123456, "left": 140.0},
        "kidney_tumor_volume_ml": 290.1,
        "tumor_volume_ml": 0.0,
        "tumor_count": 0,
        "weights": {"name": "w", "sha256": "ab" * 32},
        "kitsseg_version": "9.9",
    }
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "a.nii.gz").write_bytes(b"mask")
    (tmp_path / "b.json").write_text(json.dumps({**report, "output": "b.nii.gz"}))  # no mask: left out
    (tmp_path / "kitsseg-batch.json").write_text(json.dumps({"format": "kitsseg-batch/1"}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "empty.json").write_text(
        json.dumps({**report, "output": "empty.nii.gz", "kidney_tumor_volume_ml": 0})
    )
    (tmp_path / "empty.nii.gz").write_bytes(b"mask")
    rows = cohort_rows(tmp_path)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "done"), ("empty", "empty")]
    assert rows[0]["right_kidney_ml"] == 150.123
    assert rows[0]["kidney_hu_mean"] is None  # a report without HU statistics (older kitsseg)
    table = _read(write_cohort_table(tmp_path))
    assert table[0]["kidney_hu_mean"] == ""
    assert table[0]["weights_sha256"] == "ab" * 32


# ----------------------------------------------------------------------------------------------- discovery


def test_kits_layout_and_dicom_subfolders_are_cases(tmp_path: Path, model) -> None:
    from dicomseries import stored_hu, write_series

    src = tmp_path / "in"
    ct, labels = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    ct = stored_hu(ct)  # integer HU, exactly what the DICOM copy stores
    for name, with_labels in (("case_00000", True), ("case_00210", False)):  # 210: KiTS19 test, no labels
        write_frame(ct, src / name / "imaging.nii.gz", spacing=SPACING)
        if with_labels:
            write_frame(labels, src / name / "segmentation.nii.gz", spacing=SPACING)
    write_series(src / "patient_7", ct, SPACING)
    write_frame(ct, src / "flat.nii.gz", spacing=SPACING, layout="ras")
    (src / "notes").mkdir()
    (src / "notes" / "readme.txt").write_text("not a case\n")
    found = find_case_inputs(src)
    assert [p.relative_to(src).as_posix() for p in found] == [
        "flat.nii.gz",
        "case_00000/imaging.nii.gz",
        "case_00210/imaging.nii.gz",
        "patient_7",
    ]
    result = segment_folder(src, tmp_path / "out", weights=model)
    assert sorted(o.case for o in result.done) == ["case_00000", "case_00210", "flat", "patient_7"]
    # The same CT four times, in three kinds of input: the same labels.
    first = load_labels(tmp_path / "out" / "case_00000.nii.gz").data
    assert set(np.unique(first)) == {0, 1, 2}
    for case in ("case_00210", "flat", "patient_7"):
        np.testing.assert_array_equal(load_labels(tmp_path / "out" / f"{case}.nii.gz").data, first)
    assert len(_read(tmp_path / "out" / COHORT_FILE)) == 4
