"""`segment` and `segment_folder` end to end on phantoms with oracle weights (see oracle.py).

The oracle kidney model finds exactly the phantom's kidney+tumor voxels and the tumor model exactly its
tumor voxels, so with mild noise the whole pipeline must reproduce the phantom's labels voxel for voxel,
in whatever array layout the CT is stored.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsseg.errors import InputNotFoundError, KitssegError, OutputError
from kitsseg.evaluation.phantom import make_phantom, write_phantom
from kitsseg.inference.batch import BatchResult, parts_from_env, resolve_parts, segment_folder, split_cases
from kitsseg.inference.outputs import report_path_for
from kitsseg.inference.segment import load_model, segment
from kitsseg.io.load import load_labels
from kitsseg.io.save import write_frame
from kitsseg.postprocess.pipeline import PostprocessOptions
from oracle import write_oracle_weights

SHAPE = (20, 64, 64)
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


@pytest.fixture(scope="module")
def model(weights: Path):
    return load_model(weights, device="cpu", threads=1)


def _phantom(folder: Path, layout: str, seed: int = 3) -> tuple[Path, Path]:
    return write_phantom(folder, layout, shape=SHAPE, spacing=SPACING, seed=seed, noise_hu=1.0)


def test_kits19_and_ras_layouts_give_the_same_labels(tmp_path: Path, model) -> None:
    results = {}
    for layout in ("kits19", "ras", "lps"):
        ct, gt = _phantom(tmp_path / layout, layout)
        out = tmp_path / f"{layout}_mask.nii.gz"
        result = segment(ct, out, weights=model, reference=gt)
        results[layout] = (ct, out, result)
        src, dst = nib.load(str(ct)), nib.load(str(out))
        assert dst.shape == src.shape
        np.testing.assert_allclose(dst.affine, src.affine)
        assert int(dst.header["qform_code"]) == int(src.header["qform_code"])
        assert int(dst.header["sform_code"]) == int(src.header["sform_code"])
        assert dst.get_data_dtype() == np.uint8
    assert nib.load(str(results["kits19"][0])).shape != nib.load(str(results["ras"][0])).shape
    frames = {layout: load_labels(out).data for layout, (_, out, _) in results.items()}
    _, truth = make_phantom(SHAPE, SPACING, seed=3, noise_hu=1.0)
    assert set(np.unique(truth)) == {0, 1, 2}
    for layout, labels in frames.items():
        np.testing.assert_array_equal(labels, truth, err_msg=layout)
        ref = results[layout][2].report["reference"]
        assert ref["dice_kidney_tumor"] == pytest.approx(1.0)
        assert ref["dice_tumor"] == pytest.approx(1.0)


def test_report_fields_and_side_volumes(tmp_path: Path, model) -> None:
    ct, _ = _phantom(tmp_path, "ras", seed=5)
    out = tmp_path / "out" / "mask.nii.gz"
    result = segment(ct, out, weights=model)
    assert result.report_path == tmp_path / "out" / "mask.json"
    report = json.loads(result.report_path.read_text())
    assert report == result.report
    for key in (
        "input",
        "shape_zrc",
        "spacing_mm_zrc",
        "weights",
        "device",
        "timings_s",
        "kidney_volume_ml",
        "tumor_count",
        "tumors",
        "removed",
    ):
        assert key in report, key
    assert report["input"] == str(ct)
    assert report["shape_zrc"] == list(SHAPE)
    assert report["spacing_mm_zrc"] == pytest.approx(SPACING)
    assert report["weights"]["name"] == "oracle"
    assert len(report["weights"]["sha256"]) == 64
    assert set(report["timings_s"]) == {"load", "kidney", "tumor", "postprocess", "write", "total"}
    from kitsseg.nets.fused_unet import fused_available

    assert report["network_engine"] == ("onednn-fused" if fused_available(model.device) else "torch")
    _, truth = make_phantom(SHAPE, SPACING, seed=5, noise_hu=1.0)
    voxel_ml = np.prod(SPACING) / 1000
    right = np.count_nonzero(truth[..., :32]) * voxel_ml
    left = np.count_nonzero(truth[..., 32:]) * voxel_ml
    assert right > 0
    assert left > 0
    assert report["kidney_volume_ml"]["right"] == pytest.approx(right)
    assert report["kidney_volume_ml"]["left"] == pytest.approx(left)
    assert report["tumor_count"] == 1 == len(report["tumors"])
    tumor = report["tumors"][0]
    assert tumor["volume_ml"] == pytest.approx(np.count_nonzero(truth == 2) * voxel_ml)
    assert tumor["max_axial_diameter_mm"] > 0
    assert tumor["eigenvalue_ratio"] >= 1.0
    assert tumor["side"] in ("right", "left")
    assert report["removed"] == []


def test_tumor_outside_the_shape_bounds_is_removed_with_its_reason(tmp_path: Path, model) -> None:
    """Below the lower bound with the paper's rule (``round_exempt_mm=None``) the phantom's small tumor is
    removed; with the defaults it is small enough (<= 20 mm) to be exempt from the lower bound and kept."""
    ct, _ = _phantom(tmp_path, "kits19", seed=5)
    kept = segment(ct, tmp_path / "kept.nii.gz", weights=model, eig_bounds=(5.0, 6.0))
    assert kept.labels is not None
    assert (kept.labels == 2).any()
    assert kept.report["postprocess"]["round_exempt_mm"] == 20.0
    paper = PostprocessOptions(round_exempt_mm=None)
    result = segment(ct, tmp_path / "m.nii.gz", weights=model, eig_bounds=(5.0, 6.0), postprocess=paper)
    labels = result.labels
    assert labels is not None
    assert not (labels == 2).any()
    assert (labels == 1).any()
    assert result.report["tumor_count"] == 0
    (removed,) = result.report["removed"]
    assert removed["kind"] == "tumor"
    assert "eigenvalue ratio" in removed["reason"]
    assert result.report["postprocess"]["eig_bounds"] == [5.0, 6.0]


def test_no_postprocess_keeps_raw_output(tmp_path: Path, model) -> None:
    ct, _ = _phantom(tmp_path, "kits19", seed=5)
    raw = segment(
        ct,
        tmp_path / "raw.nii.gz",
        weights=model,
        eig_bounds=(5.0, 6.0),
        postprocess=PostprocessOptions.none(),
    )
    assert raw.labels is not None
    assert (raw.labels == 2).any()
    assert raw.report["removed"] == []
    assert raw.report["postprocess"]["tumor_shape"] is False


def test_weights_without_tumor_model(tmp_path: Path) -> None:
    w = write_oracle_weights(tmp_path / "kidney_only.pt", tumor=False)
    ct, _ = _phantom(tmp_path, "kits19")
    result = segment(ct, tmp_path / "m.nii.gz", weights=w, device="cpu", threads=1)
    assert result.labels is not None
    assert set(np.unique(result.labels)) == {0, 1}
    assert any("no tumor model" in n for n in result.report["notes"])


def test_preview_png(tmp_path: Path, model) -> None:
    from PIL import Image

    ct, _ = _phantom(tmp_path, "kits19")
    png = tmp_path / "p" / "preview.png"
    result = segment(ct, tmp_path / "m.nii.gz", weights=model, preview_path=png)
    assert result.preview_path == png
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.mode == "RGB"
        pixels = np.asarray(img)
    assert (pixels[..., 1] > pixels[..., 0] + 50).any()  # green kidney overlay
    assert (pixels[..., 0] > pixels[..., 1] + 50).any()  # red tumor overlay
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]


def test_output_over_input_is_refused_and_input_untouched(tmp_path: Path, weights: Path) -> None:
    ct, gt = _phantom(tmp_path, "kits19")
    before = ct.read_bytes()
    with pytest.raises(OutputError, match="input"):
        segment(ct, ct, weights=weights)
    with pytest.raises(OutputError, match="input"):
        segment(ct, tmp_path / "m.nii.gz", weights=weights, report_path=ct)
    with pytest.raises(OutputError, match="reference"):
        segment(ct, gt, weights=weights, reference=gt)
    with pytest.raises(OutputError, match=r"\.nii"):
        segment(ct, tmp_path / "mask.png", weights=weights)
    assert ct.read_bytes() == before
    assert sorted(p.name for p in ct.parent.iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]


def test_output_folder_gets_the_case_name(tmp_path: Path, model) -> None:
    ct, _ = _phantom(tmp_path, "kits19")
    folder = tmp_path / "results"
    folder.mkdir()
    result = segment(ct, folder, weights=model)
    assert result.output_path == folder / "case_00000.nii.gz"
    assert (folder / "case_00000.json").is_file()


def test_missing_input(tmp_path: Path, weights: Path) -> None:
    with pytest.raises(InputNotFoundError):
        segment(tmp_path / "nope.nii.gz", tmp_path / "m.nii.gz", weights=weights)


def test_report_path_for() -> None:
    assert report_path_for(Path("a/mask.nii.gz")) == Path("a/mask.json")
    assert report_path_for(Path("a/mask.nii")) == Path("a/mask.json")


# ---------------------------------------------------------------------------------------------- folders


def _folder(tmp_path: Path, n: int = 5, bad: int | None = None) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        path = src / f"case_{i:02d}.nii.gz"
        if i == bad:
            path.write_text("this is not a NIfTI file\n")
            continue
        ct, _ = make_phantom(SHAPE, SPACING, seed=i, noise_hu=1.0)
        write_frame(ct, path, spacing=SPACING, layout="ras" if i % 2 else "kits19")
    return src


def test_batch_with_one_bad_file_writes_the_others(tmp_path: Path, model) -> None:
    src = _folder(tmp_path, bad=2)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    seen: list[str] = []
    result = segment_folder(src, out, weights=model, on_case_done=lambda o, i, n: seen.append(o.case))
    assert isinstance(result, BatchResult)
    assert [o.case for o in result.failed] == ["case_02"]
    assert "case_02" in result.failed[0].message
    assert "NIfTI" in result.failed[0].message
    assert len(result.done) == 4
    assert seen == [f"case_{i:02d}" for i in range(5)]
    masks = sorted(p.name for p in out.glob("*.nii.gz"))
    assert masks == [f"case_{i:02d}.nii.gz" for i in (0, 1, 3, 4)]
    assert sorted(p.name for p in out.glob("case_*.json")) == [f"case_{i:02d}.json" for i in (0, 1, 3, 4)]
    for name in masks:
        assert set(np.unique(load_labels(out / name).data)) <= {0, 1, 2}
    summary = json.loads(result.summary_path.read_text())
    assert summary["failed"][0]["case"] == "case_02"
    assert summary["done"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_unexpected_error_in_one_case_does_not_stop_the_batch(tmp_path: Path, model, monkeypatch) -> None:
    seg = importlib.import_module("kitsseg.inference.batch")  # where segment_folder looks it up

    real = seg._segment_case

    def flaky(src, *args, **kwargs):
        if "case_01" in str(src):
            raise RuntimeError("boom")
        return real(src, *args, **kwargs)

    monkeypatch.setattr(seg, "_segment_case", flaky)
    result = segment_folder(_folder(tmp_path, n=3), tmp_path / "out", weights=model)
    assert [o.case for o in result.failed] == ["case_01"]
    assert "RuntimeError: boom" in result.failed[0].message
    assert len(result.done) == 2


def test_continue_skips_finished_cases_and_redoes_broken_ones(tmp_path: Path, model) -> None:
    src = _folder(tmp_path, n=3)
    out = tmp_path / "out"
    first = segment_folder(src, out, weights=model)
    assert len(first.done) == 3
    stamp = (out / "case_00.nii.gz").stat().st_mtime_ns
    (out / "case_01.nii.gz").write_bytes(b"\x1f\x8b truncated")  # a broken output
    (out / "case_02.json").unlink()  # a case interrupted between mask and report
    again = segment_folder(src, out, weights=model, continue_=True)
    assert [o.status for o in again.outcomes] == ["skipped", "done", "done"]
    assert (out / "case_00.nii.gz").stat().st_mtime_ns == stamp
    assert load_labels(out / "case_01.nii.gz").data.shape == SHAPE


def test_continue_needs_no_model_when_everything_is_done(tmp_path: Path, model) -> None:
    src = _folder(tmp_path, n=2)
    out = tmp_path / "out"
    segment_folder(src, out, weights=model)
    result = segment_folder(src, out, weights=tmp_path / "missing.pt", continue_=True)
    assert [o.status for o in result.outcomes] == ["skipped", "skipped"]


def test_two_parts_cover_every_case_once(tmp_path: Path, model) -> None:
    src = _folder(tmp_path, n=5)
    out = tmp_path / "out"
    a = segment_folder(src, out, weights=model, num_parts=2, part_id=0)
    b = segment_folder(src, out, weights=model, num_parts=2, part_id=1)
    cases_a, cases_b = [o.case for o in a.outcomes], [o.case for o in b.outcomes]
    assert cases_a == ["case_00", "case_02", "case_04"]
    assert cases_b == ["case_01", "case_03"]
    assert sorted(p.name for p in out.glob("case_*.nii.gz")) == [f"case_{i:02d}.nii.gz" for i in range(5)]
    assert (out / "kitsseg-batch-part0-of2.json").exists()
    assert (out / "kitsseg-batch-part1-of2.json").exists()


def test_parts_from_slurm_environment() -> None:
    assert parts_from_env({}) is None
    assert parts_from_env({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "2"}) == (4, 2)
    env = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert parts_from_env(env) == (3, 2)
    env = {
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    assert parts_from_env(env) == (3, 2)
    assert resolve_parts(None, None, {}) == (1, 0)
    assert resolve_parts(None, None, {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3"}) == (4, 3)
    assert resolve_parts(2, 1, {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3"}) == (2, 1)
    with pytest.raises(KitssegError, match="part-id"):
        resolve_parts(3, None, {})
    with pytest.raises(KitssegError, match="between 0 and 1"):
        resolve_parts(2, 2, {})
    with pytest.raises(KitssegError, match="SLURM"):
        parts_from_env({"SLURM_ARRAY_TASK_COUNT": "x", "SLURM_ARRAY_TASK_ID": "1"})


def test_slurm_variables_pick_the_part(tmp_path: Path, model, monkeypatch) -> None:
    src = _folder(tmp_path, n=3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    result = segment_folder(src, tmp_path / "out", weights=model)
    assert (result.num_parts, result.part_id) == (2, 1)
    assert [o.case for o in result.outcomes] == ["case_01"]


def test_split_is_deterministic_and_sorted() -> None:
    cases = [Path(f"/d/case_{i}.nii.gz") for i in (3, 0, 2, 1)]
    parts = [split_cases(cases, 3, k) for k in range(3)]
    assert [p.name for p in parts[0]] == ["case_0.nii.gz", "case_3.nii.gz"]
    assert sorted(p for part in parts for p in part) == sorted(cases)


def test_folder_errors(tmp_path: Path, model) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputNotFoundError, match="no .nii"):
        segment_folder(empty, tmp_path / "out", weights=model)
    with pytest.raises(InputNotFoundError):
        segment_folder(tmp_path / "missing", tmp_path / "out", weights=model)
    src = _folder(tmp_path, n=2)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(OutputError, match="overwrite an input"):
        segment_folder(src, src, weights=model)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_preview_slice_choice() -> None:
    from kitsseg.reporting.preview import pick_slices

    labels = np.zeros((10, 4, 4), dtype=np.uint8)
    assert pick_slices(labels, 4) == [0, 3, 6, 9]  # nothing found: evenly spaced
    labels[2, :2] = 2
    labels[7] = 1
    labels[5, 0, 0] = 1
    assert pick_slices(labels, 2) == [2, 7]  # the most tumor, then the most kidney
    assert pick_slices(labels, 6) == [2, 5, 7]  # only slices that show something
