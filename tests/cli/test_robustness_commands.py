"""Issue 18, the other commands: ``stats``, ``evaluate``, ``train`` and ``weights import`` refuse an output
that is, or links to, one of their inputs (one error line, the OutputError code, inputs untouched, nothing
created), and ``evaluate`` writes ``per_case.csv`` and ``summary.json`` both or neither.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kitsseg.errors import EXIT_BATCH_FAILED, OutputError
from kitsseg.weights.manage import import_weights
from kitsseg.weights.registry import Registry
from oracle import write_oracle_weights
from robustness import assert_one_error, phantom_labels, run_cli, snapshot


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    monkeypatch.setenv("KITSSEG_HOME", str(tmp_path / "home"))


def _link(kind: str, target: Path, link: Path) -> Path:
    """``link`` made to name ``target``: the same path, a symlink or a hard link."""
    if kind == "same":
        return target
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return link


LINKS = ["same", "symlink", "hardlink"]


# ------------------------------------------------------------------------------------------ stats


@pytest.mark.parametrize("kind", LINKS)
def test_stats_refuses_to_write_onto_a_label_file(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels"
    for i in range(2):
        phantom_labels(labels / f"case_{i:02d}.nii.gz", seed=i)
    out = _link(kind, labels / "case_00.nii.gz", tmp_path / "stats.json")
    before = snapshot(tmp_path)
    assert run_cli(["stats", labels, "-o", out]) == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "is the label file")
    assert snapshot(tmp_path) == before  # the label file byte-identical, nothing written


@pytest.mark.parametrize("dot", [".", ""])
def test_stats_refuses_a_folder_as_output_before_reading(
    dot: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    phantom_labels(tmp_path / "labels" / "case_00.nii.gz")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["stats", tmp_path / "labels", "-o", dot]) == OutputError.exit_code
    err = capsys.readouterr().err
    assert_one_error(err, "is a folder; give a file name")
    assert "reading labels" not in err


def test_stats_output_under_a_file_says_it_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o labels/case_00.nii.gz/stats.json``: the "folder" is the label file, which exists; the line said
    it did not exist. Refused before any label is read, nothing changed."""
    label = phantom_labels(tmp_path / "labels" / "case_00.nii.gz")
    before = snapshot(tmp_path)
    assert run_cli(["stats", tmp_path / "labels", "-o", label / "stats.json"]) == OutputError.exit_code
    err = capsys.readouterr().err
    assert_one_error(err, f"{label} is a file, not a folder")
    assert "does not exist" not in err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------ evaluate


def _pred_gt(tmp_path: Path) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for case in ("case_a", "case_b"):
        phantom_labels(pred / f"{case}.nii.gz")
        phantom_labels(gt / f"{case}.nii.gz", seed=2)
    return pred, gt


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_evaluate_refuses_outputs_that_link_to_an_input(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, gt = _pred_gt(tmp_path)
    scores = tmp_path / "scores"
    scores.mkdir()
    _link(kind, gt / "case_a.nii.gz", scores / "summary.json")
    before = snapshot(tmp_path)
    assert run_cli(["evaluate", pred, gt, "-o", scores]) == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "is the input file")
    assert snapshot(tmp_path) == before


def _fsync_fails_at(call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.fsync`` reports a full disk on its ``call``-th use (1-based), as a disk filling up would."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("call", [1, 2])
def test_evaluate_writes_both_files_or_neither(
    call: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills while per_case.csv (1) or summary.json (2) is written: neither appears, and an
    earlier pair in the folder is left exactly as it was."""
    pred, gt = _pred_gt(tmp_path)
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    kept.mkdir()
    (kept / "per_case.csv").write_text("old csv\n")
    (kept / "summary.json").write_text("{}\n")
    _fsync_fails_at(call, monkeypatch)
    assert run_cli(["evaluate", pred, gt, "-o", fresh]) == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "was changed: free some space or choose another folder")
    assert not fresh.exists()  # the folder this run created is removed again
    _fsync_fails_at(call, monkeypatch)
    assert run_cli(["evaluate", pred, gt, "-o", kept]) == OutputError.exit_code
    assert sorted(p.name for p in kept.iterdir()) == ["per_case.csv", "summary.json"]  # no temporaries
    assert (kept / "per_case.csv").read_text() == "old csv\n"
    assert (kept / "summary.json").read_text() == "{}\n"


def test_evaluate_output_under_a_file_does_not_blame_the_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o`` below a file (``gt/case_a.nii.gz/scores``) fails with "Not a directory"; the line told the user
    to free some space. It names the cause and asks for another folder; nothing is created."""
    pred, gt = _pred_gt(tmp_path)
    before = snapshot(tmp_path)
    assert run_cli(["evaluate", pred, gt, "-o", gt / "case_a.nii.gz" / "scores"]) == OutputError.exit_code
    line = assert_one_error(capsys.readouterr().err, "Not a directory; neither per_case.csv nor summary.json")
    assert line.endswith("was changed: choose another folder"), line
    assert "free some space" not in line
    assert snapshot(tmp_path) == before


def test_evaluate_writes_both_files_when_the_disk_has_room(tmp_path: Path) -> None:
    pred, gt = _pred_gt(tmp_path)
    assert run_cli(["evaluate", pred, gt, "-o", tmp_path / "scores"]) in (0, EXIT_BATCH_FAILED)
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["per_case.csv", "summary.json"]


# ------------------------------------------------------------------------------------------ train


def _dataset(tmp_path: Path) -> Path:
    """A KiTS19-shaped folder; the refusals happen before any of it is read, so the files are stand-ins."""
    data = tmp_path / "data"
    for case in ("case_00000", "case_00001"):
        (data / case).mkdir(parents=True)
        (data / case / "imaging.nii.gz").write_bytes(b"stand-in")
        (data / case / "segmentation.nii.gz").write_bytes(b"stand-in")
    return data


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-o", "{data}"], "is the dataset folder DATA_DIR"),
        (["-o", "{data}/case_00000/run"], "lies in the case folder"),
        (["-o", "{tmp}/run", "--cache-dir", "{data}"], "--cache-dir"),
        (["-o", "{tmp}/run", "--model", "tumor", "--kidney-weights", "{tmp}/run/weights.pt"], "weights.pt"),
        (["-o", "{tmp}/link", "--model", "tumor", "--kidney-weights", "{tmp}/run/k.pt"], "--kidney-weights"),
    ],
)
def test_train_refuses_outputs_on_its_inputs(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _dataset(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_oracle_weights(run / "weights.pt")
    write_oracle_weights(run / "k.pt")
    (tmp_path / "link").symlink_to(run, target_is_directory=True)  # a second name for the run folder
    before = snapshot(tmp_path)
    argv = ["train", data, *(a.format(data=data, tmp=tmp_path) for a in args), "--device", "cpu"]
    assert run_cli(argv) == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, fragment)
    assert snapshot(tmp_path) == before  # nothing read was changed, no run folder or cache created


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["{data}", "-o", "{tmp}/afile"], "-o {tmp}/afile is a file, not a folder"),
        (["{data}", "-o", "{tmp}/afile/run"], "lies under {tmp}/afile, which is a file"),
        (["{data}", "-o", "{tmp}/run", "--cache-dir", "{tmp}/afile"], "--cache-dir {tmp}/afile is a file"),
        (["--config", "{tmp}/recipe.json", "-o", "{tmp}/afile"], "-o {tmp}/afile is a file, not a folder"),
    ],
)
def test_train_refuses_a_run_folder_that_is_a_file(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o`` or ``--cache-dir`` naming a file (or a path under one) was a FileExistsError or
    NotADirectoryError traceback from mkdir, after the data had been read."""
    data = _dataset(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "recipe.json").write_text("{}")
    before = snapshot(tmp_path)
    argv = ["train", *(a.format(data=data, tmp=tmp_path) for a in args), "--device", "cpu"]
    assert run_cli(argv) == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, fragment.format(tmp=tmp_path))
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("kind", LINKS)
def test_weights_import_refuses_the_cached_file_itself(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cached = import_weights(
        write_oracle_weights(tmp_path / "mine.pt"),
        "mine",
        cache_dir=cache,
        registry=Registry.from_entries([]),
    )
    src = _link(kind, cached, tmp_path / "again.pt")
    before = snapshot(tmp_path)
    code = run_cli(["weights", "import", src, "--name", "mine", "--cache-dir", cache])
    assert code == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "in the cache already")
    assert snapshot(tmp_path) == before
