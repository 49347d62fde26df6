"""Viewer-ready NIfTI masks (kitsseg.io.labeltable): intent code, descrip, and the Slicer/ITK-SNAP tables."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsseg.evaluation.phantom import write_phantom
from kitsseg.inference.segment import load_model, segment
from kitsseg.io.frame import Volume
from kitsseg.io.labeltable import (
    LABELS,
    NIFTI_DESCRIP,
    itksnap_labels,
    slicer_ctbl,
    table_paths,
    write_label_tables,
)
from kitsseg.io.save import save_labels
from oracle import write_oracle_weights


def test_slicer_colour_table_lines() -> None:
    text = slicer_ctbl()
    assert text.startswith("# Color table file")  # Slicer's marker of a discrete lookup table
    rows = [line.split() for line in text.splitlines() if not line.startswith("#")]
    assert rows == [
        ["0", "background", "0", "0", "0", "0"],
        ["1", "kidney", "0", "200", "0", "255"],
        ["2", "tumor", "230", "0", "0", "255"],
    ]


def test_itksnap_label_description_lines() -> None:
    pattern = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([01])\s+([01])\s+"([^"]*)"$')
    rows = [pattern.match(line) for line in itksnap_labels().splitlines() if not line.startswith("#")]
    assert all(rows)
    parsed = [(int(m[1]), (int(m[2]), int(m[3]), int(m[4])), int(m[6]), m[8]) for m in rows if m]
    assert parsed == [
        (0, (0, 0, 0), 0, "Clear Label"),
        (1, LABELS[1].rgb, 1, "kidney"),
        (2, LABELS[2].rgb, 1, "tumor"),
    ]


@pytest.mark.parametrize("name", ["case_7.nii.gz", "case_7.nii", "case_7.NII.GZ"])
def test_table_paths_sit_beside_the_mask(tmp_path: Path, name: str) -> None:
    assert table_paths(tmp_path / name) == (tmp_path / "case_7.ctbl", tmp_path / "case_7.label.txt")


def test_one_list_of_nifti_suffixes() -> None:
    """The label tables and the volume I/O strip the same suffixes: one tuple, from the leaf module."""
    from kitsseg import names
    from kitsseg.io import inputs, labeltable, save

    assert save.NIFTI_SUFFIXES is names.NIFTI_SUFFIXES
    assert inputs.NIFTI_SUFFIXES is names.NIFTI_SUFFIXES
    assert labeltable.NIFTI_SUFFIXES is names.NIFTI_SUFFIXES
    assert names.NIFTI_SUFFIXES == (".nii.gz", ".nii")


def test_write_label_tables(tmp_path: Path) -> None:
    paths = write_label_tables(tmp_path / "m.nii.gz")
    assert [p.name for p in paths] == ["m.ctbl", "m.label.txt"]
    assert paths[0].read_text() == slicer_ctbl()
    assert paths[1].read_text() == itksnap_labels()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ctbl", "m.label.txt"]  # no temporaries


def test_saved_masks_are_label_images(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1, 2:4, 2:4] = 2
    like = Volume.from_frame(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0))
    out = save_labels(labels, like, tmp_path / "m.nii.gz")
    header = nib.load(str(out)).header
    assert int(header["intent_code"]) == 1002
    assert header.get_intent()[0] == "label"
    assert header["descrip"].item().decode() == NIFTI_DESCRIP
    assert len(NIFTI_DESCRIP.encode()) <= 80


def test_segment_writes_the_tables_and_a_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct, _ = write_phantom(tmp_path / "in", "ras", shape=(12, 48, 48), spacing=(2.5, 0.8, 0.8), seed=2)
    model = load_model(write_oracle_weights(tmp_path / "oracle.pt"), device="cpu", threads=1)
    result = segment(ct, tmp_path / "out" / "m.nii.gz", weights=model)
    assert all(p.is_file() for p in table_paths(result.output_path))

    import kitsseg.io.labeltable

    out2 = tmp_path / "out2" / "m.nii.gz"
    seen: list[bool] = []

    def full_disk(mask: Path) -> list[Path]:
        seen.append(out2.is_file() and out2.with_suffix("").with_suffix(".json").is_file())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kitsseg.io.labeltable, "write_label_tables", full_disk)
    with pytest.raises(OSError, match="No space"):
        segment(ct, out2, weights=model)
    assert seen == [True]  # mask and report were written before the tables failed ...
    assert list(out2.parent.glob("*")) == []  # ... and removed with them: no half result
