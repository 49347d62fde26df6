"""The command line under bad input and at scale (issue 8; the table is docs/errors.md).

Every mistake a user can make must end in one red ``error:`` line on stderr, the exit code that
docs/errors.md documents, no traceback, inputs left byte-identical and no output or temporary file left
behind. The matrix runs the real CLI in subprocesses (``python -m kitsseg``), so what is checked is what a
user sees: the exit status of the process and its stderr. Batches must give every good case its outputs
whatever the bad ones do, job-array parts must cover every case exactly once, and Ctrl-C or a full disk
must not leave half a result. All of it runs on tiny phantoms with the oracle weights of oracle.py, so
nothing depends on the default weights or the network.
"""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from kitsseg.cli import main
from kitsseg.cli._app import EXIT_TERMINATED
from kitsseg.errors import (
    EXIT_BATCH_FAILED,
    EXIT_INTERRUPTED,
    ChecksumError,
    DeviceError,
    GridMismatchError,
    InputNotFoundError,
    InvalidImageError,
    InvalidOptionError,
    OutputError,
    ResourceError,
    WeightsError,
)
from kitsseg.evaluation.phantom import make_phantom
from kitsseg.io.load import load_ct, load_labels
from kitsseg.io.save import write_frame
from kitsseg.weights.manage import import_weights
from oracle import write_oracle_weights

SHAPE = (12, 48, 48)
SPACING = (2.5, 0.8, 0.8)
#: click's exit code for a command line it cannot parse (unknown option, value out of range).
USAGE = 2


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty weights cache, so no test reads or writes the user's own."""
    return tmp_path_factory.mktemp("kitsseg-home")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", KITSSEG_OFFLINE="1", KITSSEG_HOME=str(home))
    env.update(extra)
    return env


def _kitsseg(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kitsseg", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _phantom_ct(
    path: Path, seed: int = 1, shape: tuple[int, int, int] = SHAPE, layout: str = "kits19"
) -> Path:
    ct, _ = make_phantom(shape, SPACING, seed=seed, noise_hu=1.0)
    return write_frame(ct, path, spacing=SPACING, layout=layout)


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden temporary files included), by relative path; folders
    appear as ``"<folder>"``, so an empty output folder left behind shows up too."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() or p.is_symlink() else "<folder>"
        )
        for p in sorted(folder.rglob("*"))
    }


def _error_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines that are not warnings."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def _assert_one_error(stderr: str, fragment: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert fragment in lines[0], stderr


# ------------------------------------------------------------------------------------- bad inputs


@dataclass
class BadInput:
    """One row of the matrix: the arguments after ``segment`` (or the whole command line when
    ``command`` is False), the exit code and the start of the message docs/errors.md documents."""

    args: list[str | Path]
    code: int
    message: str
    command: str = "segment"
    env: dict[str, str] = field(default_factory=dict)
    default_weights: bool = True
    #: Text the error line must not contain (an option the user never gave, a stray nibabel message).
    absent: tuple[str, ...] = ()


def _nifti_bytes(header_shape: tuple[int, ...], dtype: type = np.int16) -> bytes:
    """A NIfTI-1 header that declares ``header_shape`` followed by a few bytes of data only."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(header_shape)
    buf = io.BytesIO()
    header.write_to(buf)
    return buf.getvalue() + b"\0" * 4 + b"\0" * 64


def _save(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return path


def _good(w: Path) -> Path:
    return _phantom_ct(w / "ct.nii.gz")


def _with_voxel(w: Path, value: float) -> Path:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    ct[3, 10, 10] = value
    return write_frame(ct, w / "ct.nii.gz", spacing=SPACING)


def _missing(w: Path) -> BadInput:
    return BadInput([w / "nope.nii.gz", "-o", w / "out" / "m.nii.gz"], InputNotFoundError.exit_code, "input ")


def _folder_without_nifti(w: Path) -> BadInput:
    (w / "cts").mkdir()
    (w / "cts" / "notes.txt").write_text("no images here\n")
    return BadInput([w / "cts", "-o", w / "out"], InputNotFoundError.exit_code, "input folder ")


def _text_named_nii_gz(w: Path) -> BadInput:
    (w / "ct.nii.gz").write_text("this is not a NIfTI file\n")
    return BadInput(
        [w / "ct.nii.gz", "-o", w / "out" / "m.nii.gz"],
        InvalidImageError.exit_code,
        "is not a readable NIfTI",
    )


def _truncated_gzip(w: Path) -> BadInput:
    data = _good(w).read_bytes()
    (w / "ct.nii.gz").write_bytes(data[: len(data) // 2])
    return BadInput(
        [w / "ct.nii.gz", "-o", w / "out" / "m.nii.gz"],
        InvalidImageError.exit_code,
        "is not a readable NIfTI",
    )


def _truncated_nii(w: Path) -> BadInput:
    (w / "ct.nii").write_bytes(_nifti_bytes((64, 64, 64)))
    return BadInput([w / "ct.nii", "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "is truncated")


def _image_2d(w: Path) -> BadInput:
    path = _save(np.zeros((48, 48), np.float32), w / "ct.nii.gz")
    return BadInput([path, "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "is 2D")


def _image_4d(w: Path) -> BadInput:
    path = _save(np.zeros((16, 16, 8, 3), np.float32), w / "ct.nii.gz")
    return BadInput([path, "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "is 4D with 3 volumes")


def _volume_index_out_of_range(w: Path) -> BadInput:
    path = _save(np.zeros((16, 16, 8, 3), np.float32), w / "ct.nii.gz")
    return BadInput(
        [path, "-o", w / "out" / "m.nii.gz", "--volume-index", "3"],
        InvalidImageError.exit_code,
        "volume_index=",
    )


def _volume_index_with_a_folder(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    args = [w / "cts", "-o", w / "out", "--volume-index", "0"]
    return BadInput(args, InvalidOptionError.exit_code, "--volume-index works on a single 4D file")


def _zero_length_axis(w: Path) -> BadInput:
    path = _save(np.zeros((16, 0, 8), np.int16), w / "ct.nii.gz")
    return BadInput([path, "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "has an empty axis")


def _nan_voxels(w: Path) -> BadInput:
    path = _with_voxel(w, float("nan"))
    return BadInput([path, "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "NaN or infinite")


def _inf_voxels(w: Path) -> BadInput:
    path = _with_voxel(w, float("-inf"))
    return BadInput([path, "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "NaN or infinite")


def _too_large_for_memory(w: Path) -> BadInput:
    # The header promises 30000 x 30000 x 3000 voxels (about 25 TiB as float32); the estimate refuses it
    # before a single voxel is read. Compressed, so the truncation check (plain .nii only) does not fire.
    (w / "ct.nii.gz").write_bytes(gzip.compress(_nifti_bytes((30000, 30000, 3000))))
    return BadInput([w / "ct.nii.gz", "-o", w / "out" / "m.nii.gz"], ResourceError.exit_code, "needs about")


def _output_is_input(w: Path) -> BadInput:
    ct = _good(w)
    return BadInput([ct, "-o", ct], OutputError.exit_code, "the output path ")


def _output_folder_is_input_folder(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    return BadInput([w / "cts", "-o", w / "cts"], OutputError.exit_code, "output ")


def _output_parent_is_a_file(w: Path) -> BadInput:
    ct = _good(w)
    (w / "blocker").write_text("a file where the output folder should be\n")
    return BadInput(
        [ct, "-o", w / "blocker" / "masks" / "m.nii.gz"],
        OutputError.exit_code,
        "cannot create the output folder",
    )


def _output_folder_parent_is_a_file(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    (w / "blocker").write_text("a file where the output folder should be\n")
    return BadInput(
        [w / "cts", "-o", w / "blocker" / "masks"], OutputError.exit_code, "cannot create the output"
    )


def _output_not_nifti(w: Path) -> BadInput:
    return BadInput([_good(w), "-o", w / "out" / "mask.txt"], OutputError.exit_code, "output ")


def _reference_missing(w: Path) -> BadInput:
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--reference", w / "nope.nii.gz"]
    return BadInput(args, InputNotFoundError.exit_code, "reference ")


def _reference_on_another_grid(w: Path) -> BadInput:
    labels = write_frame(np.zeros((SHAPE[0], 40, 40), np.uint8), w / "gt.nii.gz", spacing=SPACING)
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--reference", labels]
    return BadInput(args, GridMismatchError.exit_code, "reference ")


def _reference_with_other_labels(w: Path) -> BadInput:
    # A KiTS21/23 label file (3 = cyst) as --reference: its Dice counted the cyst as kidney, exit 0.
    ref = np.zeros(SHAPE, np.uint8)
    ref[4:8, 10:20, 10:20] = 1
    ref[5:7, 12:15, 12:15] = 3
    labels = write_frame(ref, w / "gt.nii.gz", spacing=SPACING)
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--reference", labels]
    return BadInput(args, InvalidImageError.exit_code, "has label values 3 (expected 0, 1, 2")


def _cuda_without_gpu(w: Path) -> BadInput:
    return BadInput(
        [_good(w), "-o", w / "out" / "m.nii.gz", "--device", "cuda"], DeviceError.exit_code, "--device cuda"
    )


def _unknown_device(w: Path) -> BadInput:
    return BadInput(
        [_good(w), "-o", w / "out" / "m.nii.gz", "--device", "tpu"], DeviceError.exit_code, "unknown device"
    )


def _weights_missing(w: Path) -> BadInput:
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--weights", w / "nope.pt"]
    return BadInput(args, WeightsError.exit_code, "weights file ", default_weights=False)


def _weights_checksum(w: Path) -> BadInput:
    home = w.parent / "home"  # outside the snapshot: the cache is the weights tool's business
    src = write_oracle_weights(w.parent / "mine.pt")
    cached = import_weights(src, "mine", cache_dir=home)
    with cached.open("ab") as fh:  # bit rot in the cache after the import
        fh.write(b"\0")
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--weights", "mine"]
    return BadInput(
        args,
        ChecksumError.exit_code,
        "the cached weights file",
        env={"KITSSEG_HOME": str(home)},
        default_weights=False,
    )


def _batch_size_zero(w: Path) -> BadInput:
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--batch-size", "0"]
    return BadInput(args, USAGE, "Invalid value for '--batch-size'")


def _unknown_option(w: Path) -> BadInput:
    return BadInput([_good(w), "-o", w / "out" / "m.nii.gz", "--bogus"], USAGE, "No such option: --bogus")


def _bad_eig_bounds(w: Path) -> BadInput:
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--eig-bounds", "3,1"]
    return BadInput(args, InvalidOptionError.exit_code, "--eig-bounds expects")


def _parts_for_a_file(w: Path) -> BadInput:
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--num-parts", "2", "--part-id", "0"]
    return BadInput(args, InvalidOptionError.exit_code, "--num-parts and --part-id split a folder")


def _part_id_out_of_range(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    args = [w / "cts", "-o", w / "out", "--num-parts", "2", "--part-id", "2"]
    return BadInput(args, InvalidOptionError.exit_code, "--part-id must be between 0 and 1")


def _bad_slurm_env(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    env = {"SLURM_ARRAY_TASK_COUNT": "four", "SLURM_ARRAY_TASK_ID": "1"}
    return BadInput(
        [w / "cts", "-o", w / "out"], InvalidOptionError.exit_code, "cannot read the Slurm", env=env
    )


# ------------------------------------------------------------ issue 18: outputs, scaling, spacing, parts


def _output_link_to_input(w: Path, hard: bool) -> BadInput:
    ct = _good(w)
    link = w / "mask.nii.gz"
    if hard:
        os.link(ct, link)
    else:
        link.symlink_to(ct)
    return BadInput([ct, "-o", link], OutputError.exit_code, "the output path ")


def _output_folder_holds_the_input(w: Path) -> BadInput:
    # -o FOLDER writes FOLDER/<case>.nii.gz, which is the input here (as -o . would be beside it)
    return BadInput([_good(w), "-o", w], OutputError.exit_code, "the output path ")


def _output_without_a_stem(w: Path) -> BadInput:
    args = [_good(w), "-o", w / "out" / ".nii.gz"]
    return BadInput(args, OutputError.exit_code, "has no name before .nii.gz")


def _report_is_the_weights(w: Path) -> BadInput:
    mine = write_oracle_weights(w / "mine.pt")
    args = [_good(w), "-o", w / "out" / "m.nii.gz", "--report", mine, "--weights", mine]
    return BadInput(args, OutputError.exit_code, "is the weights file", default_weights=False)


def _scaled_to_infinity(w: Path) -> BadInput:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    img = nib.Nifti1Image(np.round(ct).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(1e38, 0.0)  # finite in the header, infinite once applied in float32
    nib.save(img, str(w / "ct.nii.gz"))
    args = [w / "ct.nii.gz", "-o", w / "out" / "m.nii.gz"]
    return BadInput(args, InvalidImageError.exit_code, "beyond what float32 holds")


def _absurd_spacing(w: Path) -> BadInput:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame(ct, w / "ct.nii.gz", spacing=(1e30, 0.8, 0.8))
    return BadInput([path, "-o", w / "out" / "m.nii.gz"], InvalidImageError.exit_code, "voxel spacing")


def _colliding_names_across_parts(w: Path) -> BadInput:
    # case_00.nii and case_00.nii.gz sort next to each other, so each part of two gets one of them: the
    # check must look at the whole folder, or part 0 and part 1 overwrite each other's case_00.nii.gz.
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    _phantom_ct(w / "cts" / "case_00.nii", seed=2)
    _phantom_ct(w / "cts" / "case_01.nii.gz", seed=3)
    args = [w / "cts", "-o", w / "out", "--num-parts", "2", "--part-id", "1"]
    return BadInput(args, OutputError.exit_code, "would both be written to case_00.nii.gz")


def _case_named_like_the_summary(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    _phantom_ct(w / "cts" / "kitsseg-batch.nii.gz", seed=2)
    return BadInput([w / "cts", "-o", w / "out"], OutputError.exit_code, "the name of a batch summary")


def _slurm_part_out_of_range(w: Path) -> BadInput:
    (w / "cts").mkdir()
    _phantom_ct(w / "cts" / "case_00.nii.gz")
    env = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "5"}
    args = [w / "cts", "-o", w / "out"]
    code = InvalidOptionError.exit_code
    return BadInput(args, code, "SLURM_ARRAY_TASK_ID=5", env=env, absent=("--part-id must",))


def _header_fixed_by_nibabel(w: Path) -> BadInput:
    # nibabel "fixes" a negative pixdim and logs it on its own handler; the voxels are NaN, so the one line
    # must be kitsseg's error, without nibabel's message beside it.
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    ct[3, 10, 10] = np.nan
    img = nib.Nifti1Image(ct, np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header["pixdim"][1] = -0.8
    nib.save(img, str(w / "ct.nii.gz"))
    args = [w / "ct.nii.gz", "-o", w / "out" / "m.nii.gz"]
    return BadInput(args, InvalidImageError.exit_code, "NaN or infinite", absent=("pixdim",))


def _markup_in_the_path(w: Path) -> BadInput:
    # rich reads [/x] as a closing tag (MarkupError) and [anon] as a style: both must print as typed
    folder = w / "in[/x][anon]"  # two folders, "in[" and "x][anon]"
    folder.mkdir(parents=True)
    (folder / "ct.nii.gz").write_text("not a NIfTI\n")
    args = [folder / "ct.nii.gz", "-o", w / "out" / "m.nii.gz"]
    return BadInput(args, InvalidImageError.exit_code, "in[/x][anon]/ct.nii.gz is not a readable NIfTI")


MATRIX: dict[str, Callable[[Path], BadInput]] = {
    "missing-path": _missing,
    "folder-without-nifti": _folder_without_nifti,
    "text-named-nii-gz": _text_named_nii_gz,
    "truncated-gzip": _truncated_gzip,
    "truncated-nii": _truncated_nii,
    "2d-image": _image_2d,
    "4d-image": _image_4d,
    "4d-volume-index-out-of-range": _volume_index_out_of_range,
    "4d-volume-index-with-a-folder": _volume_index_with_a_folder,
    "zero-length-axis": _zero_length_axis,
    "nan-voxels": _nan_voxels,
    "inf-voxels": _inf_voxels,
    "too-large-for-memory": _too_large_for_memory,
    "output-is-input": _output_is_input,
    "output-folder-is-input-folder": _output_folder_is_input_folder,
    "output-parent-is-a-file": _output_parent_is_a_file,
    "output-folder-parent-is-a-file": _output_folder_parent_is_a_file,
    "output-not-nifti": _output_not_nifti,
    "reference-missing": _reference_missing,
    "reference-on-another-grid": _reference_on_another_grid,
    "reference-with-other-labels": _reference_with_other_labels,
    "cuda-without-gpu": _cuda_without_gpu,
    "unknown-device": _unknown_device,
    "weights-missing": _weights_missing,
    "weights-checksum": _weights_checksum,
    "batch-size-zero": _batch_size_zero,
    "unknown-option": _unknown_option,
    "bad-eig-bounds": _bad_eig_bounds,
    "parts-for-a-file": _parts_for_a_file,
    "part-id-out-of-range": _part_id_out_of_range,
    "bad-slurm-env": _bad_slurm_env,
    # issue 18: nothing lost, nothing silently wrong
    "output-symlink-to-input": lambda w: _output_link_to_input(w, hard=False),
    "output-hardlink-to-input": lambda w: _output_link_to_input(w, hard=True),
    "output-folder-holds-the-input": _output_folder_holds_the_input,
    "output-without-a-stem": _output_without_a_stem,
    "report-is-the-weights": _report_is_the_weights,
    "scaled-to-infinity": _scaled_to_infinity,
    "absurd-spacing": _absurd_spacing,
    "colliding-names-across-parts": _colliding_names_across_parts,
    "case-named-like-the-summary": _case_named_like_the_summary,
    "slurm-part-out-of-range": _slurm_part_out_of_range,
    "header-fixed-by-nibabel": _header_fixed_by_nibabel,
    "markup-in-the-path": _markup_in_the_path,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_bad_input_matrix(name: str, tmp_path: Path, weights: Path, home: Path) -> None:
    """One bad input: its documented code, one error line, no traceback, nothing changed or left behind."""
    if name == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    work = tmp_path / "work"
    work.mkdir()
    case = MATRIX[name](work)
    before = _snapshot(work)
    args = [case.command, *case.args, "--threads", "1"]
    if "--device" not in args:
        args += ["--device", "cpu"]
    if case.default_weights:
        args += ["--weights", weights]
    proc = _kitsseg(args, _env(home, **case.env))
    assert proc.returncode == case.code, proc.stderr
    assert proc.returncode != 0
    _assert_one_error(proc.stderr, case.message)
    for text in case.absent:
        assert text not in proc.stderr, proc.stderr
    # Inputs byte-identical, and not one file more: no output, no report, no hidden temporary file, and
    # no output folder created for a run that was refused.
    assert _snapshot(work) == before


def test_errors_doc_matches_the_tests() -> None:
    """docs/errors.md has a row for every case of the matrix (at least twelve), and every test it
    names exists, so the table cannot drift from what is tested."""
    tests = Path(__file__).resolve().parents[1]
    doc = (tests.parent / "docs" / "errors.md").read_text()
    assert len(MATRIX) >= 12
    assert set(re.findall(r"matrix\[([\w-]+)\]", doc)) == set(MATRIX)
    defined = {
        name for f in tests.rglob("test_*.py") for name in re.findall(r"^def (test_\w+)", f.read_text(), re.M)
    }
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", doc))
    assert named, "the table names no tests"
    assert named <= defined, sorted(named - defined)


# --------------------------------------------------------------------------------- warnings, scaling


@pytest.mark.slow
def test_values_not_in_hu_give_one_warning_line(tmp_path: Path, weights: Path, home: Path) -> None:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame((ct + 1000.0) / 4000.0, tmp_path / "normalised.nii.gz", spacing=SPACING)
    out = tmp_path / "out" / "m.nii.gz"
    proc = _kitsseg(["segment", path, "-o", out, "--weights", weights, "--device", "cpu"], _env(home))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith("warning: ") for line in lines), proc.stderr  # warnings only, one line each
    # One line for the values (the result checks may add their own, e.g. that no kidney was found).
    warning_lines = [line for line in lines if "Hounsfield" in line]
    assert len(warning_lines) == 1, proc.stderr
    assert "do not look like Hounsfield units" in warning_lines[0]
    assert ".py:" not in proc.stderr  # no file name, line number or source line
    report = json.loads(out.with_name("m.json").read_text())
    assert any("Hounsfield" in w for w in report["warnings"])


def _run(argv: list[str | Path]) -> int:
    """The CLI in this process; its exit code."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _segment_args(weights: Path) -> list[str | Path]:
    return ["--weights", weights, "--device", "cpu", "--threads", "1"]


def test_scaled_integer_ct_is_segmented_like_float(tmp_path: Path, weights: Path) -> None:
    """int16 voxels with scl_slope/scl_inter load as slope * stored + inter HU, and segment the same."""
    ct, _ = make_phantom(SHAPE, SPACING, seed=3, noise_hu=1.0)
    hu = np.round(ct / 2.0) * 2.0  # even HU values: exactly 2 * stored - 1024 for int16 stored values
    float_path = write_frame(hu.astype(np.float32), tmp_path / "float.nii.gz", spacing=SPACING)
    ref = nib.load(str(float_path))
    stored = ((hu + 1024.0) / 2.0).astype(np.int16)  # frame == stored layout for kits19 files
    img = nib.Nifti1Image(stored, ref.affine, header=ref.header.copy())
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -1024.0)
    int_path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(int_path))
    assert nib.load(str(int_path)).get_data_dtype() == np.int16
    np.testing.assert_array_equal(load_ct(int_path).data, load_ct(float_path).data)
    out_f, out_i = tmp_path / "f_seg.nii.gz", tmp_path / "i_seg.nii.gz"
    assert _run(["segment", float_path, "-o", out_f, *_segment_args(weights)]) == 0
    assert _run(["segment", int_path, "-o", out_i, *_segment_args(weights)]) == 0
    labels_i = load_labels(out_i).data
    np.testing.assert_array_equal(labels_i, load_labels(out_f).data)
    assert set(np.unique(labels_i)) == {0, 1, 2}


def test_4d_file_with_volume_index(tmp_path: Path, weights: Path) -> None:
    ct, _ = make_phantom(SHAPE, SPACING, seed=2, noise_hu=1.0)
    first = write_frame(ct, tmp_path / "one.nii.gz", spacing=SPACING)
    ref = nib.load(str(first))
    stack = np.stack([np.full(ct.shape, -1000.0, np.float32), np.asarray(ref.dataobj)], axis=-1)
    path = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(stack, ref.affine), str(path))
    out = tmp_path / "m.nii.gz"
    assert _run(["segment", path, "-o", out, "--volume-index", "1", *_segment_args(weights)]) == 0
    saved = nib.load(str(out))
    assert saved.shape == ct.shape  # a 3D mask for the chosen volume
    assert set(np.unique(np.asarray(saved.dataobj))) == {0, 1, 2}
    assert json.loads((tmp_path / "m.json").read_text())["volume_index"] == 1


# ------------------------------------------------------------------------------ unwritable output


def test_output_folder_without_write_permission(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any work. Root may write anywhere, so the permission check is simulated."""
    ct = _phantom_ct(tmp_path / "ct.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if Path(str(path)) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    code = _run(["segment", ct, "-o", locked / "m.nii.gz", *_segment_args(weights)])
    assert code == OutputError.exit_code
    _assert_one_error(capsys.readouterr().err, f"the output folder {locked} is not writable")
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------------- full disk


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_the_mask(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ct = _phantom_ct(tmp_path / "in" / "ct.nii.gz")
    before = ct.read_bytes()

    def half_written(img: object, filename: str) -> None:
        Path(filename).write_bytes(b"\x1f\x8b partial")  # the disk fills up in the middle of the file
        _enospc()

    monkeypatch.setattr(nib, "save", half_written)
    out = tmp_path / "out" / "m.nii.gz"
    assert _run(["segment", ct, "-o", out, *_segment_args(weights)]) == OutputError.exit_code
    err = capsys.readouterr().err
    _assert_one_error(err, f"cannot write {out}: the disk is full")
    assert not (tmp_path / "out").exists()  # no mask, no report, no temporary file, no empty folder
    assert ct.read_bytes() == before


def test_full_disk_while_writing_the_report_removes_the_mask(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mask without its report is half a result: it is removed, so --continue redoes the case."""
    import kitsseg.io.atomic

    ct = _phantom_ct(tmp_path / "ct.nii.gz")
    flush = kitsseg.io.atomic._fsync_path
    flushed: list[str] = []

    def disk_full_at_the_report(path: Path) -> None:  # only the report's temporary file hits the full disk
        flushed.append(path.name)
        if path.name.startswith(".m.json."):
            _enospc()
        flush(path)

    monkeypatch.setattr(kitsseg.io.atomic, "_fsync_path", disk_full_at_the_report)
    out = tmp_path / "out" / "m.nii.gz"
    assert _run(["segment", ct, "-o", out, *_segment_args(weights)]) == OutputError.exit_code
    _assert_one_error(capsys.readouterr().err, "cannot write the report")
    assert not (tmp_path / "out").exists()  # the folder this run created is gone too
    # The mask was flushed to disk like every output (its temporary keeps the .nii.gz), then the report.
    assert [name.endswith(".tmp.nii.gz") for name in flushed] == [True, False]


# ------------------------------------------------------------------------------ batches and parts


def _batch(folder: Path, n: int = 5, bad: int | None = None) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        path = folder / f"case_{i:02d}.nii.gz"
        if i == bad:
            path.write_text("plain text, not a NIfTI\n")
        else:
            _phantom_ct(path, seed=i, layout="ras" if i % 2 else "kits19")
    return folder


@pytest.mark.slow
def test_batch_of_five_with_one_bad_file(tmp_path: Path, weights: Path, home: Path) -> None:
    src = _batch(tmp_path / "in", bad=2)
    before = _snapshot(src)
    out = tmp_path / "out"
    proc = _kitsseg(["segment", src, "-o", out, "--weights", weights, "--device", "cpu"], _env(home))
    assert proc.returncode == EXIT_BATCH_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr
    good = [f"case_{i:02d}" for i in (0, 1, 3, 4)]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in good]
    for case in good:
        assert set(np.unique(load_labels(out / f"{case}.nii.gz").data)) <= {0, 1, 2}
        assert "kidney_volume_ml" in json.loads((out / f"{case}.json").read_text())
    summary_line = _error_lines(proc.stderr)[-1]
    assert summary_line.startswith("error: 1 case(s) failed: case_02")
    assert summary_line.endswith("the other outputs were written")
    assert "case_02" in proc.stdout  # the summary table
    summary = json.loads((out / "kitsseg-batch.json").read_text())
    assert [f["case"] for f in summary["failed"]] == ["case_02"]
    assert "not a readable NIfTI" in summary["failed"][0]["message"]
    assert summary["done"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    assert _snapshot(src) == before


def test_batch_of_only_bad_files_says_no_mask_was_written(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every case failed: the last line said "the other outputs were written" where there were none."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (src / name).write_text("plain text, not a NIfTI\n")
    out = tmp_path / "out"
    assert _run(["segment", src, "-o", out, *_segment_args(weights)]) == EXIT_BATCH_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = _error_lines(err)[-1]
    assert last == "error: 2 case(s) failed: a, b; no mask was written", err
    assert not list(out.glob("*.nii.gz"))


def _cases_of(summary_path: Path) -> list[str]:
    return [c["case"] for c in json.loads(summary_path.read_text())["cases"]]


def test_two_job_array_parts_cover_every_case_once(tmp_path: Path, weights: Path) -> None:
    src = _batch(tmp_path / "in", bad=3)
    out = tmp_path / "out"
    codes = [
        _run(["segment", src, "-o", out, "--num-parts", "2", "--part-id", str(i), *_segment_args(weights)])
        for i in (0, 1)
    ]
    assert codes == [0, EXIT_BATCH_FAILED]  # case_03 (bad) falls in part 1
    part0 = _cases_of(out / "kitsseg-batch-part0-of2.json")
    part1 = _cases_of(out / "kitsseg-batch-part1-of2.json")
    assert not set(part0) & set(part1)
    assert sorted(part0 + part1) == [f"case_{i:02d}" for i in range(5)]
    assert sorted(p.name for p in out.glob("case_*.nii.gz")) == [f"case_{i:02d}.nii.gz" for i in (0, 1, 2, 4)]
    # --continue after both parts: the four good cases are skipped, only the bad one is tried again.
    assert _run(["segment", src, "-o", out, "--continue", *_segment_args(weights)]) == EXIT_BATCH_FAILED
    statuses = {c["case"]: c["status"] for c in json.loads((out / "kitsseg-batch.json").read_text())["cases"]}
    assert statuses == {
        "case_00": "skipped",
        "case_01": "skipped",
        "case_02": "skipped",
        "case_03": "failed",
        "case_04": "skipped",
    }


def test_slurm_array_variables_are_the_default_split(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _batch(tmp_path / "in", n=5)
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-3: task ids 1, 2, 3 are parts 0, 1, 2
    monkeypatch.delenv("SLURM_ARRAY_TASK_STEP", raising=False)
    seen: list[str] = []
    for task in ("1", "2", "3"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert _run(["segment", src, "-o", out, *_segment_args(weights)]) == 0
        part = int(task) - 1
        cases = _cases_of(out / f"kitsseg-batch-part{part}-of3.json")
        assert cases == [f"case_{i:02d}" for i in range(part, 5, 3)]
        seen += cases
    assert sorted(seen) == [f"case_{i:02d}" for i in range(5)]
    # Options on the command line win over the environment.
    assert _run(["segment", src, "-o", out, "--num-parts", "1", "--continue", *_segment_args(weights)]) == 0
    assert len(_cases_of(out / "kitsseg-batch.json")) == 5


# ------------------------------------------------------------------------------------------ Ctrl-C


def test_console_script_runs_through_the_interrupt_safe_entry() -> None:
    """``kitsseg`` (the installed script) starts in ``__main__.run``, like ``python -m kitsseg``."""
    from importlib.metadata import entry_points

    scripts = [e for e in entry_points(group="console_scripts") if e.name == "kitsseg"]
    assert [e.value for e in scripts] == ["kitsseg.__main__:run"]


def test_ctrl_c_while_the_cli_imports_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    from kitsseg.__main__ import run

    class Importing(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "kitsseg.cli", Importing("kitsseg.cli"))
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 130
    assert capsys.readouterr().err == "error: interrupted; no partial output was left behind\n"


#: Runs the real CLI, with predict_volume wrapped to say when the work has started and to hold the
#: process there until the test interrupts it (a fixed sleep before SIGINT would race model loading).
_INTERRUPTIBLE = """
import sys, time
from pathlib import Path
import kitsseg.inference.predict as predict

ready, at_call = Path(sys.argv[1]), int(sys.argv[2])
original, calls = predict.predict_volume, []

def predict_volume(*args, **kwargs):
    calls.append(1)
    if len(calls) < at_call:
        return original(*args, **kwargs)
    ready.touch()
    result = original(*args, **kwargs)
    time.sleep(60)
    return result

predict.predict_volume = predict_volume
from kitsseg.cli import main
main(sys.argv[3:])
"""


def _interrupt(
    args: list[str | Path],
    ready: Path,
    at_call: int,
    env: dict[str, str],
    sig: signal.Signals = signal.SIGINT,
) -> tuple[int, str]:
    cmd = [sys.executable, "-c", _INTERRUPTIBLE, str(ready), str(at_call), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the segment run never started its work"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_output(tmp_path: Path, weights: Path, home: Path) -> None:
    ct = _phantom_ct(tmp_path / "in" / "ct.nii.gz", shape=(40, 128, 128))
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out" / "m.nii.gz"
    args = ["segment", ct, "-o", out, "--weights", weights, "--device", "cpu", "--threads", "1"]
    code, err = _interrupt(args, tmp_path / "ready", 1, _env(home))
    assert code == EXIT_INTERRUPTED, err
    _assert_one_error(err, "interrupted")
    assert not (tmp_path / "out").exists()  # the folder this run created is gone too
    assert _snapshot(tmp_path / "in") == before


@pytest.mark.slow
def test_sigterm_leaves_no_partial_output(tmp_path: Path, weights: Path, home: Path) -> None:
    """SIGTERM (Slurm at the time limit, ``kill``) runs the same cleanup as Ctrl-C and exits 128 + 15."""
    ct = _phantom_ct(tmp_path / "in" / "ct.nii.gz", shape=(40, 128, 128))
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out" / "m.nii.gz"
    args = ["segment", ct, "-o", out, "--weights", weights, "--device", "cpu", "--threads", "1"]
    code, err = _interrupt(args, tmp_path / "ready", 1, _env(home), sig=signal.SIGTERM)
    assert code == EXIT_TERMINATED == 143, err
    _assert_one_error(err, "terminated; no partial output was left behind")
    assert not (tmp_path / "out").exists()  # the folder this run created is gone too
    assert _snapshot(tmp_path / "in") == before


def test_sigterm_handler_is_restored_after_main() -> None:
    """main installs its SIGTERM handler only while it runs; a library user's own handler comes back."""

    def own(signum: int, frame: object) -> None:  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        assert _run(["--version"]) == 0
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_ctrl_c_in_a_batch_keeps_the_finished_cases(tmp_path: Path, weights: Path, home: Path) -> None:
    src = _batch(tmp_path / "in", n=3)
    out = tmp_path / "out"
    args = ["segment", src, "-o", out, "--weights", weights, "--device", "cpu", "--threads", "1"]
    code, err = _interrupt(args, tmp_path / "ready", 2, _env(home))  # during the second case
    assert code == EXIT_INTERRUPTED, err
    _assert_one_error(err, "interrupted")
    # case_00 complete (its mask, report and label tables), nothing of the interrupted cases, no temporaries
    names = sorted(p.name for p in out.iterdir())
    assert {"case_00.json", "case_00.nii.gz", "kitsseg-batch.json"} <= set(names)
    assert [n for n in names if not n.startswith("case_00.") and n != "kitsseg-batch.json"] == []
    assert set(np.unique(load_labels(out / "case_00.nii.gz").data)) <= {0, 1, 2}
    summary = json.loads((out / "kitsseg-batch.json").read_text())
    assert summary["interrupted"] is True
    assert [c["case"] for c in summary["cases"]] == ["case_00"]
    # --continue picks up where it stopped: case_00 is skipped, the other two are segmented.
    assert _run(["segment", src, "-o", out, "--continue", *_segment_args(weights)]) == 0
    statuses = [c["status"] for c in json.loads((out / "kitsseg-batch.json").read_text())["cases"]]
    assert statuses == ["skipped", "done", "done"]


# ------------------------------------------------------------------------------------------ evaluate


@pytest.mark.slow
def test_evaluate_turns_bad_pairs_into_error_rows(tmp_path: Path, home: Path) -> None:
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[2:5, 4:9, 4:9] = 1
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for case in ("case_a", "case_b", "case_c"):
        write_frame(labels, gt / f"{case}.nii.gz", spacing=SPACING)
    write_frame(labels, pred / "case_a.nii.gz", spacing=SPACING)
    write_frame(np.zeros((8, 16, 12), np.uint8), pred / "case_b.nii.gz", spacing=SPACING)  # other grid
    (pred / "case_c.nii.gz").write_text("not a NIfTI\n")  # unreadable
    before = {**_snapshot(pred), **{f"gt/{k}": v for k, v in _snapshot(gt).items()}}
    proc = _kitsseg(["evaluate", pred, gt, "-o", tmp_path / "scores"], _env(home))
    assert proc.returncode == EXIT_BATCH_FAILED, proc.stderr
    _assert_one_error(proc.stderr, "2 of 3 matched cases could not be evaluated")
    with (tmp_path / "scores" / "per_case.csv").open(newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert rows["case_a"]["status"] == "ok"
    assert float(rows["case_a"]["dice_kidney_tumor"]) == pytest.approx(1.0)
    assert rows["case_b"]["status"] == "error"
    assert "GridMismatchError" in rows["case_b"]["message"]
    assert rows["case_c"]["status"] == "error"
    assert "not a readable NIfTI" in rows["case_c"]["message"]
    errors = json.loads((tmp_path / "scores" / "summary.json").read_text())["errors"]
    assert [e["case"] for e in errors] == ["case_b", "case_c"]
    assert {**_snapshot(pred), **{f"gt/{k}": v for k, v in _snapshot(gt).items()}} == before
