"""`kitsseg segment` from the command line: file and folder modes, exit codes, batch behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from kitsseg.cli import main
from kitsseg.errors import EXIT_BATCH_FAILED, DeviceError, InputNotFoundError, InvalidOptionError, OutputError
from kitsseg.evaluation.phantom import make_phantom, write_phantom
from kitsseg.io.load import load_labels
from kitsseg.io.save import write_frame
from oracle import write_oracle_weights

SHAPE = (20, 64, 64)
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


def _run(args: list[str], weights: Path) -> int:
    """Run the CLI in-process; return its exit code (0 when it returns normally)."""
    argv = ["segment", *map(str, args), "--weights", str(weights), "--device", "cpu", "--threads", "1"]
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _folder(tmp_path: Path, n: int = 5, bad: int | None = None) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        path = src / f"case_{i:02d}.nii.gz"
        if i == bad:
            path.write_text("plain text, not a NIfTI\n")
            continue
        ct, _ = make_phantom(SHAPE, SPACING, seed=i, noise_hu=1.0)
        write_frame(ct, path, spacing=SPACING, layout="ras" if i % 2 else "kits19")
    return src


def test_file_mode_end_to_end(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct, gt = write_phantom(tmp_path, "ras", shape=SHAPE, spacing=SPACING, seed=1, noise_hu=1.0)
    out, png = tmp_path / "res" / "mask.nii.gz", tmp_path / "res" / "preview.png"
    code = _run([ct, "-o", out, "--reference", gt, "--preview", png], weights)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    img = nib.load(str(out))
    assert img.shape == nib.load(str(ct)).shape
    assert img.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(img.dataobj))) == {0, 1, 2}
    report = json.loads((tmp_path / "res" / "mask.json").read_text())
    assert report["kidney_volume_ml"]["right"] > 0
    assert report["kidney_volume_ml"]["left"] > 0
    assert report["tumor_count"] == len(report["tumors"]) >= 1
    assert {"volume_ml", "max_axial_diameter_mm", "eigenvalue_ratio"} <= set(report["tumors"][0])
    assert report["reference"]["dice_kidney_tumor"] == pytest.approx(1.0)
    assert report["reference"]["dice_tumor"] == pytest.approx(1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "right kidney mL" in captured.out
    assert "Dice kidney+tumor" in captured.out


def test_file_mode_options_reach_the_report(tmp_path: Path, weights: Path) -> None:
    ct, _ = write_phantom(tmp_path, "kits19", shape=SHAPE, spacing=SPACING, seed=1, noise_hu=1.0)
    rep = tmp_path / "elsewhere" / "r.json"
    code = _run(
        [
            ct,
            "-o",
            tmp_path / "m.nii.gz",
            "--report",
            rep,
            "--no-tumor-shape",
            "--no-fill-holes",
            "--no-kidney-pairs",
            "--eig-bounds",
            "1.2,3",
            "--batch-size",
            "3",
            "--bf16",
        ],
        weights,
    )
    assert code == 0
    report = json.loads(rep.read_text())
    pp = report["postprocess"]
    assert pp["tumor_shape"] is False
    assert pp["fill_holes"] is False
    assert pp["keep_kidneys"] is True
    assert pp["kidney_pairs"] is False
    assert pp["eig_bounds"] == [1.2, 3.0]
    assert report["batch_size"] == 3
    assert report["bf16"] is True
    assert not (tmp_path / "m.json").exists()


def test_no_postprocess_flag(tmp_path: Path, weights: Path) -> None:
    ct, _ = write_phantom(tmp_path, "kits19", shape=SHAPE, spacing=SPACING, seed=1, noise_hu=1.0)
    assert _run([ct, "-o", tmp_path / "m.nii.gz", "--no-postprocess"], weights) == 0
    pp = json.loads((tmp_path / "m.json").read_text())["postprocess"]
    assert not any(pp[k] for k in ("fill_holes", "keep_kidneys", "tumor_shape", "tumor_overlap"))


def test_folder_mode_with_one_bad_file(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path, bad=3)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    code = _run([src, "-o", out], weights)
    captured = capsys.readouterr()
    assert code == EXIT_BATCH_FAILED
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"case_{i:02d}.nii.gz" for i in (0, 1, 2, 4)]
    for i in (0, 1, 2, 4):
        assert set(np.unique(load_labels(out / f"case_{i:02d}.nii.gz").data)) <= {0, 1, 2}
        report = json.loads((out / f"case_{i:02d}.json").read_text())
        assert "kidney_volume_ml" in report
        assert "tumors" in report
    assert "case_03" in captured.err
    assert "Traceback" not in captured.err
    assert "case_03" in captured.out  # the summary table
    summary = json.loads((out / "kitsseg-batch.json").read_text())
    assert [f["case"] for f in summary["failed"]] == ["case_03"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_folder_continue_and_parts(tmp_path: Path, weights: Path) -> None:
    src = _folder(tmp_path, n=5)
    out = tmp_path / "out"
    assert _run([src, "-o", out, "--num-parts", "2", "--part-id", "0"], weights) == 0
    part0 = json.loads((out / "kitsseg-batch-part0-of2.json").read_text())
    assert [c["case"] for c in part0["cases"]] == ["case_00", "case_02", "case_04"]
    assert _run([src, "-o", out, "--num-parts", "2", "--part-id", "1"], weights) == 0
    part1 = json.loads((out / "kitsseg-batch-part1-of2.json").read_text())
    assert [c["case"] for c in part1["cases"]] == ["case_01", "case_03"]
    assert len(list(out.glob("case_*.nii.gz"))) == 5
    assert _run([src, "-o", out, "--continue"], weights) == 0
    summary = json.loads((out / "kitsseg-batch.json").read_text())
    assert [c["status"] for c in summary["cases"]] == ["skipped"] * 5


def test_output_equal_to_input_is_refused(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct, _ = write_phantom(tmp_path, "kits19", shape=SHAPE, spacing=SPACING, seed=1)
    before = ct.read_bytes()
    assert _run([ct, "-o", ct], weights) == OutputError.exit_code
    err = capsys.readouterr().err
    assert "input" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert ct.read_bytes() == before


def test_user_errors_exit_with_their_code(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        _run([tmp_path / "missing.nii.gz", "-o", tmp_path / "m.nii.gz"], weights)
        == InputNotFoundError.exit_code
    )
    src = _folder(tmp_path, n=1)
    assert (
        _run([src, "-o", tmp_path / "o", "--reference", src / "case_00.nii.gz"], weights)
        == InvalidOptionError.exit_code
        == 2
    )
    one = [src / "case_00.nii.gz", "-o", tmp_path / "m.nii.gz"]
    assert _run([*one, "--num-parts", "2"], weights) == InvalidOptionError.exit_code
    assert _run([*one, "--eig-bounds", "x"], weights) == InvalidOptionError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_device_error(tmp_path: Path, weights: Path) -> None:
    ct, _ = write_phantom(tmp_path, "kits19", shape=SHAPE, spacing=SPACING, seed=1)
    argv = [
        "segment",
        str(ct),
        "-o",
        str(tmp_path / "m.nii.gz"),
        "--weights",
        str(weights),
        "--device",
        "cuda",
    ]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == DeviceError.exit_code
    assert not (tmp_path / "m.nii.gz").exists()


@pytest.mark.slow
def test_python_m_kitsseg_subprocess(tmp_path: Path, weights: Path) -> None:
    ct, _ = write_phantom(tmp_path, "lps", shape=SHAPE, spacing=SPACING, seed=2, noise_hu=1.0)
    out = tmp_path / "m.nii.gz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kitsseg",
            "segment",
            str(ct),
            "-o",
            str(out),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(np.unique(load_labels(out).data)) == {0, 1, 2}
