"""Issue 18, ``--continue``: a case counts as finished only when its report is complete and was made from
the very input on disk (size and sha256 recorded in the report), so a mask made from another CT of the
same shape, or a report reading ``{}``, is segmented again instead of kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kitsseg.inference.batch import is_finished
from kitsseg.io.fingerprint import FINGERPRINT_KEY, fingerprint_matches, input_fingerprint
from kitsseg.reporting.report import REQUIRED_KEYS, is_complete_report
from oracle import write_oracle_weights
from robustness import phantom_ct, run_cli, segment_args


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    monkeypatch.setenv("KITSSEG_HOME", str(tmp_path / "home"))
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


def _batch(tmp_path: Path, weights: Path) -> tuple[Path, Path]:
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        phantom_ct(src / f"case_{i:02d}.nii.gz", seed=i)
    assert run_cli(["segment", src, "-o", out, *segment_args(weights)]) == 0
    return src, out


def _continue(src: Path, out: Path, weights: Path) -> dict[str, str]:
    assert run_cli(["segment", src, "-o", out, "--continue", *segment_args(weights)]) == 0
    summary = json.loads((out / "kitsseg-batch.json").read_text())
    return {c["case"]: c["status"] for c in summary["cases"]}


def test_the_report_records_the_input_fingerprint(tmp_path: Path, weights: Path) -> None:
    src, out = _batch(tmp_path, weights)
    report = json.loads((out / "case_00.json").read_text())
    recorded = report[FINGERPRINT_KEY]
    assert recorded == input_fingerprint(src / "case_00.nii.gz")
    assert recorded["size"] == (src / "case_00.nii.gz").stat().st_size
    assert is_complete_report(report)
    assert _continue(src, out, weights) == {"case_00": "skipped", "case_01": "skipped"}


def test_another_input_of_the_same_shape_is_segmented_again(tmp_path: Path, weights: Path) -> None:
    src, out = _batch(tmp_path, weights)
    phantom_ct(src / "case_00.nii.gz", seed=7)  # replaced in place: same shape and grid, other patient
    assert _continue(src, out, weights) == {"case_00": "done", "case_01": "skipped"}
    report = json.loads((out / "case_00.json").read_text())
    assert fingerprint_matches(report[FINGERPRINT_KEY], src / "case_00.nii.gz")


def test_the_same_bytes_with_a_new_time_are_still_finished(tmp_path: Path, weights: Path) -> None:
    """A folder copied elsewhere gets new modification times but the same contents: nothing is redone."""
    src, out = _batch(tmp_path, weights)
    os.utime(src / "case_00.nii.gz", ns=(1, 1))
    assert _continue(src, out, weights) == {"case_00": "skipped", "case_01": "skipped"}


@pytest.mark.parametrize("damage", ["empty", "no-fingerprint", "no-volumes", "other-format", "list"])
def test_an_incomplete_report_is_not_finished(damage: str, tmp_path: Path, weights: Path) -> None:
    src, out = _batch(tmp_path, weights)
    report_path = out / "case_01.json"
    report = json.loads(report_path.read_text())
    if damage == "empty":
        report = {}
    elif damage == "no-fingerprint":
        del report[FINGERPRINT_KEY]
    elif damage == "no-volumes":
        del report["kidney_volume_ml"]
    elif damage == "other-format":
        report["format"] = "something-else/9"
    else:
        report = [report]
    report_path.write_text(json.dumps(report))
    assert not is_finished(src / "case_01.nii.gz", out / "case_01.nii.gz", report_path)
    assert _continue(src, out, weights) == {"case_00": "skipped", "case_01": "done"}
    assert is_complete_report(json.loads(report_path.read_text()))


def test_file_mode_continue_checks_the_input_too(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out" / "m.nii.gz"
    assert run_cli(["segment", ct, "-o", out, *segment_args(weights)]) == 0
    capsys.readouterr()
    assert run_cli(["segment", ct, "-o", out, "--continue", *segment_args(weights)]) == 0
    assert "skipped" in capsys.readouterr().out
    phantom_ct(ct, seed=5)
    assert run_cli(["segment", ct, "-o", out, "--continue", *segment_args(weights)]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert fingerprint_matches(json.loads(out.with_name("m.json").read_text())[FINGERPRINT_KEY], ct)


def test_a_volume_index_other_than_the_reports_is_not_finished(tmp_path: Path, weights: Path) -> None:
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "m.nii.gz"
    assert run_cli(["segment", ct, "-o", out, *segment_args(weights)]) == 0
    assert is_finished(ct, out, tmp_path / "m.json")
    assert not is_finished(ct, out, tmp_path / "m.json", volume_index=1)


def test_fingerprints_of_files_and_folders(tmp_path: Path) -> None:
    one = tmp_path / "a.bin"
    one.write_bytes(b"x" * 100)
    recorded = input_fingerprint(one)
    assert set(recorded) == {"size", "mtime_ns", "sha256"}
    assert fingerprint_matches(recorded, one)
    one.write_bytes(b"y" * 100)  # same size, other bytes
    assert not fingerprint_matches(recorded, one)
    assert not fingerprint_matches({}, one)
    assert not fingerprint_matches(None, one)
    assert not fingerprint_matches(recorded, tmp_path / "missing")
    series = tmp_path / "series"  # a DICOM series folder: the files in it, by name, size and contents
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(bytes([i]) * 10)
    folder = input_fingerprint(series)
    assert fingerprint_matches(folder, series)
    (series / "1.dcm").write_bytes(bytes([9]) * 10)
    assert not fingerprint_matches(folder, series)


def test_required_keys_are_in_every_new_report(tmp_path: Path, weights: Path) -> None:
    _, out = _batch(tmp_path, weights)
    report = json.loads((out / "case_00.json").read_text())
    assert [k for k in REQUIRED_KEYS if k not in report] == []
