"""The report: side volumes, JSON safety (no NaN), atomic writes, and the rich tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from kitsseg.errors import OutputError
from kitsseg.inference.predict import Prediction
from kitsseg.postprocess.components import Component
from kitsseg.postprocess.pipeline import PostprocessOptions, PostprocessResult
from kitsseg.reporting.report import batch_table, build_report, report_table, side_volumes, write_json


def _render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_side_volumes_split_columns_at_the_midline() -> None:
    labels = np.zeros((2, 4, 5), dtype=np.uint8)
    labels[:, :, 0] = 1  # patient's right (image left)
    labels[0, 0, 2] = 2  # the middle column of 5 lies below 5 / 2: right
    labels[:, :, 4] = 1  # patient's left
    labels[1, 1, 3] = 2
    vols = side_volumes(labels, (2.0, 1.0, 0.5))  # 1 uL per voxel
    assert vols["right"] == pytest.approx({"kidney_ml": 8e-3, "tumor_ml": 1e-3, "total_ml": 9e-3})
    assert vols["left"] == pytest.approx({"kidney_ml": 8e-3, "tumor_ml": 1e-3, "total_ml": 9e-3})


@pytest.mark.parametrize("cols", [(0, 3), (2, 9), (5, 11), (6, 9), (0, 11)])
def test_side_volumes_on_the_labels_box_equals_counting_everything(cols: tuple[int, int]) -> None:
    """Counting only inside the labels' bounding box must split the sides exactly as the whole volume."""
    rng = np.random.default_rng(cols[0] * 31 + cols[1])
    labels = np.zeros((3, 7, 11), dtype=np.uint8)
    labels[1:3, 2:6, cols[0] : cols[1]] = rng.integers(0, 3, size=(2, 4, cols[1] - cols[0]))
    half = 6  # columns 0..5 lie below 11 / 2: the patient's right
    vols = side_volumes(labels, (1.0, 1.0, 1.0))  # 1 uL per voxel
    for side, part in (("right", labels[..., :half]), ("left", labels[..., half:])):
        assert vols[side]["kidney_ml"] == pytest.approx(np.count_nonzero(part == 1) * 1e-3)
        assert vols[side]["tumor_ml"] == pytest.approx(np.count_nonzero(part == 2) * 1e-3)
    empty = side_volumes(np.zeros((2, 3, 4), dtype=np.uint8), (1.0, 1.0, 1.0))
    assert empty["right"]["total_ml"] == 0.0
    assert empty["left"]["total_ml"] == 0.0


def _report(labels: np.ndarray, reference: dict | None = None) -> dict:
    tumor = Component(
        label=1,
        voxels=4,
        bbox=((0, 1), (0, 2), (6, 8)),
        centroid=(0.0, 0.5, 6.5),
        kind="tumor",
        volume_ml=0.004,
        eigenvalue_ratio=1.5,
        overlap=1.0,
        max_axial_diameter_mm=2.2,
    )
    speck = Component(
        label=3,
        voxels=2,
        bbox=((1, 2), (3, 4), (0, 2)),
        centroid=(1.0, 3.0, 0.5),
        kind="kidney",
        volume_ml=0.002,
        reason="not among the 2 largest kidney components",
    )
    pred = Prediction(labels > 0, labels == 2, band=(0, 2), tumor_slices=1, notes=["a note"])
    post = PostprocessResult(labels=labels, removed=[speck], tumors=[tumor])
    return build_report(
        input_path=Path("/data/ct.nii.gz"),
        output_path=Path("/out/m.nii.gz"),
        shape=labels.shape,
        spacing=(1.0, 1.0, 1.0),
        weights={"name": "tiny", "sha256": "ab" * 32},
        device="cpu (1 threads)",
        timings={"load": 0.1, "kidney": 0.2, "tumor": 0.3, "postprocess": 0.4, "write": 0.5},
        labels=labels,
        prediction=pred,
        post=post,
        options=PostprocessOptions(),
        reference=reference,
    )


def test_build_report_is_plain_json_without_nan() -> None:
    labels = np.zeros((2, 4, 8), dtype=np.uint8)
    labels[0, :2, 6:8] = 2
    labels[:, :, 0] = 1
    report = _report(
        labels, reference={"path": "gt.nii.gz", "dice_kidney_tumor": 0.9, "dice_tumor": math.nan}
    )
    text = json.dumps(report, allow_nan=False)  # raises on NaN
    assert json.loads(text) == report
    assert report["reference"]["dice_tumor"] is None
    assert report["timings_s"]["total"] == pytest.approx(1.5)
    assert report["tumor_count"] == 1
    assert report["tumors"][0]["side"] == "left"
    assert report["tumors"][0]["index"] == 1
    assert report["removed"][0]["side"] == "right"
    assert "largest" in report["removed"][0]["reason"]
    assert report["kidney_volume_ml"] == pytest.approx({"right": 0.008, "left": 0.004})
    assert report["postprocess"]["eig_bounds"] == [1.07, 2.8]
    assert report["tumor_band"] == {"first_row": 0, "height": 2, "slices": 1}


def test_write_json_is_atomic_and_readable(tmp_path: Path) -> None:
    path = write_json({"a": float("inf"), "b": [1, 2]}, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_into_a_file_raises_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write the report"):
        write_json({}, blocker / "r.json")


def test_tables_show_the_numbers() -> None:
    labels = np.zeros((2, 4, 8), dtype=np.uint8)
    labels[:, :, 0] = 1
    labels[0, :2, 6:8] = 2
    text = _render(
        report_table(_report(labels, {"path": "gt.nii.gz", "dice_kidney_tumor": 0.9123, "dice_tumor": 0.5}))
    )
    for expected in (
        "right kidney mL",
        "tumor 1 (left)",
        "0.9123",
        "not among the 2 largest",
        "a note",
        "tiny",
    ):
        assert expected in text, expected
    rows = [
        {"case": "case_a", "status": "done", "summary": {"right_ml": 1.25, "left_ml": 2.0, "tumor_count": 1}},
        {"case": "case_b", "status": "failed", "message": "not a NIfTI", "summary": {}},
    ]
    text = _render(batch_table(rows))
    assert "case_a" in text
    assert "1.2" in text
    assert "case_b" in text
    assert "not a NIfTI" in text
