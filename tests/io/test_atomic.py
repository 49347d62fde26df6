"""Atomic output: the file appears whole or not at all, with the mode open() would give."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kitsseg.errors import OutputError
from kitsseg.io.atomic import (
    atomic_output,
    current_umask,
    default_file_mode,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask_027() -> Iterator[int]:
    """Run with umask 027 (group may read, others nothing), restored afterwards."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_text_and_bytes(tmp_path: Path) -> None:
    assert write_text_atomic(tmp_path / "a.txt", "héllo\n") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temporary left


def test_newline_is_passed_through(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "t.csv", "a\r\nb\n", newline="")
    assert (tmp_path / "t.csv").read_bytes() == b"a\r\nb\n"


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_temporary_is_hidden_beside_the_target_and_keeps_a_suffix(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "case.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".case.")
        assert tmp.name.endswith(".tmp.nii.gz")
        assert tmp.exists()  # already created, so the name cannot be taken by another writer
        tmp.write_bytes(b"x")
    with atomic_output(tmp_path / "r.json") as tmp:
        assert tmp.name.startswith(".r.json.")
        assert tmp.name.endswith(".tmp")
        tmp.write_bytes(b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "r.json"]


def _write_half_then_fail(target: Path, exc: BaseException) -> None:
    with atomic_output(target) as tmp:
        tmp.write_text("half a fi")
        raise exc


@pytest.mark.parametrize("exc_type", [ValueError, OSError, KeyboardInterrupt])
def test_exception_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, exc_type: type) -> None:
    target = tmp_path / "out.json"
    target.write_text("previous")
    with pytest.raises(exc_type):
        _write_half_then_fail(target, exc_type("boom"))
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_exception_without_an_old_file_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="writer failed"):
        _write_half_then_fail(tmp_path / "new.pt", RuntimeError("writer failed"))
    assert list(tmp_path.iterdir()) == []


def test_failing_fsync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(tmp_path / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_every_output_is_flushed_masks_included(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask is flushed to disk before its rename like every other output (a crash right after the run
    must not leave a renamed but empty mask)."""
    import numpy as np

    from kitsseg.io.load import load_labels
    from kitsseg.io.save import save_labels, write_frame

    ct = write_frame(np.zeros((4, 8, 8), dtype=np.int16), tmp_path / "ct.nii.gz", spacing=(2.0, 1.0, 1.0))
    like = load_labels(ct)
    flushed: list[list[str]] = []  # the mask folder's files at each fsync
    real = os.fsync

    def recording(fd: int) -> None:
        flushed.append(sorted(p.name for p in tmp_path.iterdir() if "mask" in p.name))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    labels[1:3, 2:5, 2:5] = 1
    out = save_labels(labels, like, tmp_path / "mask.nii.gz")
    assert len(flushed) == 1  # once, while only the hidden temporary exists: before the rename
    assert len(flushed[0]) == 1
    assert flushed[0][0].startswith(".mask.")
    np.testing.assert_array_equal(load_labels(out).data, labels)


def test_writer_that_removes_the_temporary_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_output(tmp_path / "gone.txt") as tmp:
        tmp.unlink()
    assert list(tmp_path.iterdir()) == []


def test_mode_follows_the_umask(tmp_path: Path, umask_027: int) -> None:
    assert current_umask() == umask_027
    assert default_file_mode() == 0o640
    write_text_atomic(tmp_path / "a.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(tmp_path / "a.txt") == _mode(plain) == 0o640  # not mkstemp's 0600


def test_mode_for_a_writer_that_reopens_the_path(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "w.pt") as tmp:
            with open(tmp, "wb") as fh:  # what torch.save / nib.save / shutil.copyfile do
                fh.write(b"x")
        assert _mode(tmp_path / "w.pt") == 0o644
    finally:
        os.umask(old)


def test_reading_the_umask_does_not_change_it() -> None:
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        assert current_umask() == 0o022
    finally:
        assert os.umask(old) == 0o022


def test_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "no" / "such" / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []  # the helper never creates folders


# ------------------------------------------------------------------ what each caller turns it into


def test_report_into_a_missing_folder_creates_it(tmp_path: Path) -> None:
    from kitsseg.reporting.report import write_json

    out = write_json({"a": 1}, tmp_path / "new" / "r.json")
    assert out.read_text() == '{\n  "a": 1\n}\n'


def test_report_below_a_file_is_an_output_error(tmp_path: Path) -> None:
    from kitsseg.reporting.report import write_json

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write the report .*choose a writable folder"):
        write_json({}, tmp_path / "file" / "r.json")


def test_report_write_failure_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kitsseg.reporting.report import write_json

    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OutputError, match="cannot write the report") as info:
        write_json({}, tmp_path / "r.json")
    assert "choose a writable folder" not in str(info.value)  # the folder was fine, the disk was not
    assert list(tmp_path.iterdir()) == []


def test_shapestats_into_a_missing_folder_is_an_output_error(tmp_path: Path) -> None:
    from kitsseg.postprocess.shapestats import ShapeStats, write_json

    stats = ShapeStats(
        unit="voxel", min_voxels=1, largest_only=False, connectivity=1, folder=str(tmp_path), cases=[]
    )
    with pytest.raises(OutputError, match="does not exist"):
        write_json(stats, tmp_path / "missing" / "stats.json")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_outputs_below_a_file_are_an_output_error(tmp_path: Path) -> None:
    from kitsseg.evaluation.evaluate import EvaluationResult, write_outputs

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write evaluation results"):
        write_outputs(EvaluationResult(rows=[], summary={}), tmp_path / "file" / "out")


def test_json_atomic_of_the_training_code_creates_the_folder(tmp_path: Path) -> None:
    from kitsseg.training.data import write_json_atomic

    out = write_json_atomic(tmp_path / "run" / "split.json", {"b": 1, "a": [1]})
    assert out.read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'
    assert [p.name for p in out.parent.iterdir()] == ["split.json"]
