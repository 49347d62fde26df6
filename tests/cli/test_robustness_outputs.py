"""Issue 18, ``segment``: output names that cannot collide or land on inputs, checked before the model
loads, no empty folder left by a refused run, and every user string printed as typed (rich markup).

The subprocess matrix in ``test_cli_robustness.py`` has a row for each of these classes; the tests here
look closer (what was created, when the model loads, what each job-array part does) in this process.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kitsseg.errors import (
    EXIT_INTERRUPTED,
    InputNotFoundError,
    InvalidImageError,
    InvalidOptionError,
    OutputError,
)
from kitsseg.evaluation.phantom import make_phantom
from kitsseg.inference.batch import check_case_names, resolve_parts, segment_folder
from kitsseg.io.save import write_frame
from oracle import write_oracle_weights
from robustness import (
    SHAPE,
    SPACING,
    assert_one_error,
    phantom_ct,
    run_cli,
    segment_args,
    snapshot,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    monkeypatch.setenv("KITSSEG_HOME", str(tmp_path / "home"))
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


#: The modules that call ``load_model``: one file (``segment``) and a folder (``segment_folder``).
MODEL_LOADERS = (
    importlib.import_module("kitsseg.inference.segment"),
    importlib.import_module("kitsseg.inference.batch"),
)


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded although the output had to be refused first")


def _refuse_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in MODEL_LOADERS:
        monkeypatch.setattr(module, "load_model", _no_model)


# ------------------------------------------------------------------------------- names before the model


def test_output_without_a_stem_costs_no_model_load(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    _refuse_model_loads(monkeypatch)
    code = run_cli(["segment", ct, "-o", tmp_path / "out" / ".nii.gz", *segment_args(weights)])
    assert code == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "has no name before .nii.gz")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_refused_before_the_model_loads(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    _refuse_model_loads(monkeypatch)
    code = run_cli(["segment", ct, "-o", tmp_path / "blocker" / "m.nii.gz", *segment_args(weights)])
    assert code == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "is a file, not a folder")


@pytest.mark.parametrize("dot", [".", ""])
def test_dot_and_empty_output_mean_the_current_folder(
    dot: str,
    tmp_path: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``-o .`` and ``-o ""`` (an unset shell variable) name the current folder: <case>.nii.gz goes there,
    and where that is the input itself it is refused with one line, never a traceback."""
    ct = phantom_ct(tmp_path / "in" / "ct.nii.gz")
    before = ct.read_bytes()
    monkeypatch.chdir(tmp_path / "in")
    assert run_cli(["segment", ct, "-o", dot, *segment_args(weights)]) == OutputError.exit_code
    assert_one_error(capsys.readouterr().err, "is the input file")
    assert ct.read_bytes() == before
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert run_cli(["segment", ct, "-o", dot, *segment_args(weights)]) == 0
    assert {"ct.json", "ct.nii.gz"} <= {p.name for p in (tmp_path / "work").iterdir()}


# ------------------------------------------------------------------------------- empty folders


def test_refused_input_leaves_no_empty_output_folder(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    ct[2, 5, 5] = np.nan
    path = write_frame(ct, tmp_path / "ct.nii.gz", spacing=SPACING)
    out = tmp_path / "new" / "deeper" / "m.nii.gz"
    assert run_cli(["segment", path, "-o", out, *segment_args(weights)]) == InvalidImageError.exit_code
    assert_one_error(capsys.readouterr().err, "NaN or infinite")
    assert not (tmp_path / "new").exists()  # both folders this run created are gone


def test_an_existing_output_folder_is_left_in_place(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine").mkdir()
    missing = tmp_path / "nope.nii.gz"
    code = run_cli(["segment", missing, "-o", tmp_path / "mine" / "m.nii.gz", *segment_args(weights)])
    assert code == InputNotFoundError.exit_code
    assert (tmp_path / "mine").is_dir()  # the user's own (empty) folder: not this run's to remove


def test_a_batch_whose_weights_fail_leaves_no_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phantom_ct(tmp_path / "cts" / "case_00.nii.gz")
    args = ["segment", tmp_path / "cts", "-o", tmp_path / "out", "--weights", tmp_path / "nope.pt"]
    assert run_cli([*args, "--device", "cpu"]) == 7
    assert_one_error(capsys.readouterr().err, "does not exist")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- collisions


def _folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "cts"
    for i, name in enumerate(names):
        phantom_ct(folder / name, seed=i)
    return folder


@pytest.mark.parametrize("part", [0, 1])
def test_every_part_refuses_names_that_collide_in_the_folder(
    part: int, tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """case_00.nii and case_00.nii.gz fall into different parts of two; each part alone saw no clash and
    the second part silently replaced the first part's case_00.nii.gz. Now both parts refuse, before any
    model load or folder creation."""
    folder = _folder(tmp_path, ["case_00.nii", "case_00.nii.gz", "case_01.nii.gz"])
    _refuse_model_loads(monkeypatch)
    with pytest.raises(OutputError, match="would both be written to case_00.nii.gz"):
        segment_folder(folder, tmp_path / "out", weights=weights, num_parts=2, part_id=part)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["kitsseg-batch", "kitsseg-batch-part1-of2", "kitsseg-batch-part0-of3"])
def test_a_case_named_like_a_batch_summary_is_refused(name: str, tmp_path: Path) -> None:
    cases = [tmp_path / f"{name}.nii.gz", tmp_path / "case_00.nii.gz"]
    with pytest.raises(OutputError, match="the name of a batch summary"):
        check_case_names(cases, tmp_path / "out")


def test_names_close_to_the_reserved_ones_are_fine(tmp_path: Path) -> None:
    cases = [tmp_path / f"{n}.nii.gz" for n in ("kitsseg-batches", "my-kitsseg-batch", "kitsseg-batch-part1")]
    check_case_names(cases, tmp_path / "out")  # no error


def test_a_symlinked_output_folder_onto_the_inputs_is_refused(tmp_path: Path, weights: Path) -> None:
    folder = _folder(tmp_path, ["case_00.nii.gz"])
    (tmp_path / "out").symlink_to(folder, target_is_directory=True)
    before = snapshot(folder)
    with pytest.raises(OutputError, match="would overwrite an input"):
        segment_folder(folder, tmp_path / "out", weights=weights)
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------- Slurm messages


def test_slurm_part_errors_name_the_slurm_variables() -> None:
    env = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1"}
    with pytest.raises(InvalidOptionError) as info:
        resolve_parts(None, None, env)
    message = str(info.value)
    assert "SLURM_ARRAY_TASK_ID=7" in message
    assert "SLURM_ARRAY_TASK_MIN=1" in message
    assert "SLURM_ARRAY_TASK_COUNT=3" in message
    assert "--part-id must" not in message  # the user gave no --part-id or --num-parts to blame
    assert "--num-parts 3" not in message
    # --part-id given on the command line, the count from Slurm: each named by its own origin
    expected = r"--part-id must be between 0 and 2 for SLURM_ARRAY_TASK_COUNT=3"
    with pytest.raises(InvalidOptionError, match=expected):
        resolve_parts(None, 5, env)
    with pytest.raises(InvalidOptionError, match="SLURM_ARRAY_TASK_COUNT=0 gives no parts"):
        resolve_parts(None, None, {"SLURM_ARRAY_TASK_COUNT": "0", "SLURM_ARRAY_TASK_ID": "0"})
    assert resolve_parts(None, None, {**env, "SLURM_ARRAY_TASK_ID": "3"}) == (3, 2)


# ------------------------------------------------------------------------------- rich markup


@pytest.mark.parametrize("folder", ["o[anon]", "out[/x]", "[bold]x"])
def test_markup_in_output_paths_prints_verbatim(
    folder: str, tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / folder / "m.nii.gz"
    assert run_cli(["segment", ct, "-o", out, *segment_args(weights)]) == 0
    stdout = capsys.readouterr().out
    wrote = [line for line in stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {out}, {out.with_name('m.json')}"]


def test_markup_in_warnings_and_batch_lines_is_kept(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path with [anon] in a warning, a failed case line and the batch table keeps its brackets."""
    folder = tmp_path / "[anon]"
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    write_frame((ct + 1000.0) / 4000.0, folder / "norm[x].nii.gz", spacing=SPACING)  # not HU: a warning
    (folder / "bad[red].nii.gz").write_text("not a NIfTI\n")
    code = run_cli(["segment", folder, "-o", tmp_path / "out", *segment_args(weights)])
    assert code != 0  # one case failed
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:") and "Hounsf" in line]
    assert len(warning) == 1, captured.err
    assert f"{folder}/norm[x].nii.gz holds values" in warning[0]
    failed = [line for line in captured.err.splitlines() if line.startswith("failed bad[red]: ")]
    assert len(failed) == 1, captured.err
    assert "[anon]/bad[red].nii.gz" in failed[0]
    assert "bad[red]" in captured.out  # the batch table
    assert "norm[x]" in captured.out


# ------------------------------------------------------------------------------- threads, Ctrl-C


def test_threads_above_the_cores_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    many = (os.cpu_count() or 1) + 1
    code = run_cli(["segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "m.nii.gz", "--threads", many])
    assert code == InputNotFoundError.exit_code
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert f"--threads {many} is more than the {os.cpu_count()} CPU cores" in warnings[0]
    assert_one_error(err, "does not exist")
    run_cli(["segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "m.nii.gz", "--threads", "1"])
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_absurd_thread_count_is_one_option_error_line(tmp_path: Path) -> None:
    """``--threads 100000`` (a typo for 10) made OpenMP fail to create its threads: a segmentation fault,
    no message. It is refused as an option error before any thread starts; nothing is written. In a
    subprocess, so the unfixed crash cannot take the test run with it."""
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out" / "m.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KITSSEG_OFFLINE": "1"}
    env["KITSSEG_HOME"] = str(tmp_path / "home")
    args = ["segment", str(ct), "-o", str(out), "--device", "cpu", "--threads", "100000"]
    proc = subprocess.run(
        [sys.executable, "-m", "kitsseg", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == InvalidOptionError.exit_code, proc.stderr
    assert_one_error(proc.stderr, "--threads 100000 is more than kitsseg starts (at most")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_importing_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while ``python -m kitsseg`` still imports typer: one line, exit 130, no traceback. The
    interrupt is made deterministic by a ``typer`` module that raises it when imported."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "typer.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "kitsseg", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stderr.strip() == "error: interrupted; no partial output was left behind"


def test_ctrl_c_while_main_sets_up_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kitsseg.cli._app as app

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "_sigterm_as_interrupt", interrupted)
    assert run_cli(["--version"]) == EXIT_INTERRUPTED
    assert_one_error(capsys.readouterr().err, "interrupted")
