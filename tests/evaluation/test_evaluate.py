"""evaluate(): case matching, frames, error rows, outputs, workers, the CLI, and real KiTS19 labels."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsseg.cli import main
from kitsseg.errors import EXIT_BATCH_FAILED, DatasetError, InputNotFoundError, InvalidOptionError
from kitsseg.evaluation.evaluate import COLUMNS, evaluate
from kitsseg.evaluation.metrics import EMPTY_MASK_RULE, METRIC_NAMES

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
KITS_LABELS = SHARED / "kits19-labels"

SPACING = (3.0, 0.8, 0.7)  # (z, row, col) mm
SHAPE = (6, 16, 14)


# ------------------------------------------------------------------------------------------------ helpers


def kits_affine(shape, spacing):
    """The KiTS19 stored layout: array (z, row, col), axis codes ('I', 'P', 'L')."""
    st, pr, pc = spacing
    return np.array([[0, 0, -pc, 0], [0, -pr, 0, 0], [-st, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def save_kits(path: Path, labels: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(labels.astype(np.uint8), kits_affine(labels.shape, spacing))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, path)
    return path


def save_ras(path: Path, labels: np.ndarray, spacing=SPACING) -> Path:
    """The same voxels saved as (x, y, z) in RAS, with the affine that puts them at the same places."""
    nz, nr, nc = labels.shape
    st, pr, pc = spacing
    data = labels[::-1, ::-1, ::-1].transpose(2, 1, 0)
    affine = np.diag([pc, pr, st, 1.0])
    affine[:3, 3] = [-pc * (nc - 1), -pr * (nr - 1), -st * (nz - 1)]
    img = nib.Nifti1Image(np.ascontiguousarray(data).astype(np.uint8), affine)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def phantom(seed: int = 0) -> np.ndarray:
    """A kidney box with a tumor box inside it, placed a little differently per seed."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, dtype=np.uint8)
    r0, c0 = rng.integers(1, 4, size=2)
    lab[1:5, r0 : r0 + 10, c0 : c0 + 8] = 1
    lab[2:4, r0 + 2 : r0 + 5, c0 + 2 : c0 + 5] = 2
    return lab


def np_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return math.nan if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def rows_equal(r1, r2) -> bool:
    if r1.keys() != r2.keys():
        return False
    for k in r1:
        a, b = r1[k], r2[k]
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            continue
        if a != b:
            return False
    return True


@pytest.fixture
def dataset(tmp_path):
    """gt in KiTS19 layout (with imaging.nii.gz beside), predictions as flat files, one of them in RAS."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gts = {}
    for i in range(4):
        name = f"case_{i:05d}"
        lab = phantom(i)
        gts[name] = lab
        save_kits(gt_dir / name / "segmentation.nii.gz", lab)
        ct = nib.Nifti1Image(np.zeros(SHAPE, np.float32), kits_affine(SHAPE, SPACING))
        nib.save(ct, gt_dir / name / "imaging.nii.gz")
    preds = {
        "case_00000": gts["case_00000"].copy(),  # perfect
        "case_00001": np.where(gts["case_00001"] == 2, 1, gts["case_00001"]).astype(np.uint8),  # no tumor
        "case_00002": np.roll(gts["case_00002"], 1, axis=2),  # shifted one column
    }
    save_kits(pred_dir / "case_00000.nii.gz", preds["case_00000"])
    save_kits(pred_dir / "case_00001.nii.gz", preds["case_00001"])
    save_ras(pred_dir / "case_00002.nii.gz", preds["case_00002"])  # RAS layout vs KiTS19 gt
    save_kits(pred_dir / "case_00099.nii.gz", phantom(9))  # no ground truth
    # case_00003 has no prediction
    return pred_dir, gt_dir, preds, gts


# ------------------------------------------------------------------------------------------------ library


def test_matching_metrics_and_unmatched(dataset, tmp_path):
    pred_dir, gt_dir, preds, gts = dataset
    res = evaluate(pred_dir, gt_dir)
    assert [r["case"] for r in res.rows] == ["case_00000", "case_00001", "case_00002"]
    assert all(r["status"] == "ok" for r in res.rows), res.errors
    assert [p.name for p in res.unmatched_pred] == ["case_00099.nii.gz"]
    assert [p.parent.name for p in res.unmatched_gt] == ["case_00003"]
    assert res.unmatched_gt[0].name == "segmentation.nii.gz"
    for row in res.rows:
        p, g = preds[row["case"]], gts[row["case"]]
        for key, region in (("dice_kidney_tumor", (p > 0, g > 0)), ("dice_tumor", (p == 2, g == 2))):
            exp = np_dice(*region)
            assert (math.isnan(exp) and math.isnan(row[key])) or row[key] == pytest.approx(exp, abs=1e-12)
        assert row["dice_kidney"] == pytest.approx(np_dice(p == 1, g == 1), abs=1e-12)
        voxel_ml = np.prod(SPACING) / 1000
        assert row["vol_gt_kt_ml"] == pytest.approx((g > 0).sum() * voxel_ml)
        assert row["vol_pred_tumor_ml"] == pytest.approx((p == 2).sum() * voxel_ml)
    perfect, no_tumor, shifted = res.rows
    assert perfect["dice_kidney_tumor"] == 1.0
    assert perfect["hd95_kidney_tumor_mm"] == 0.0
    assert no_tumor["dice_tumor"] == 0.0
    assert math.isnan(no_tumor["hd95_tumor_mm"])
    assert no_tumor["surface_dice_tumor"] == 0.0
    # the RAS-saved prediction was compared in the frame: one column = 0.7 mm shift
    assert 0 < shifted["dice_kidney_tumor"] < 1
    assert shifted["hd95_kidney_tumor_mm"] == pytest.approx(0.7)
    assert res.summary["metrics"]["hd95_tumor_mm"]["n"] == 2
    assert res.summary["metrics"]["hd95_tumor_mm"]["n_undefined"] == 1
    assert res.summary["metrics"]["dice_tumor"]["n"] == 3


def test_ras_prediction_of_kits_gt_scores_perfect(tmp_path):
    lab = phantom(3)
    gt = save_kits(tmp_path / "gt" / "case_00007" / "segmentation.nii.gz", lab)
    pred = save_ras(tmp_path / "pred" / "case_00007.nii.gz", lab)
    assert nib.load(pred).shape != nib.load(gt).shape  # really stored differently
    res = evaluate(tmp_path / "pred", tmp_path / "gt")
    (row,) = res.rows
    assert row["status"] == "ok", row["message"]
    assert row["dice_kidney_tumor"] == 1.0
    assert row["dice_tumor"] == 1.0
    assert row["dice_kidney"] == 1.0
    assert row["hd95_tumor_mm"] == 0.0


def test_single_files_are_paired(tmp_path):
    lab = phantom(1)
    gt = save_kits(tmp_path / "truth.nii.gz", lab)
    pred = save_kits(tmp_path / "mask.nii.gz", np.where(lab == 2, 0, lab).astype(np.uint8))
    res = evaluate(pred, gt)
    (row,) = res.rows
    assert row["dice_tumor"] == 0.0
    assert row["dice_kidney"] == pytest.approx(np_dice(lab == 1, lab == 1))
    assert res.unmatched_pred == []
    assert res.unmatched_gt == []


def test_single_prediction_against_gt_folder(dataset):
    pred_dir, gt_dir, _, _ = dataset
    res = evaluate(pred_dir / "case_00001.nii.gz", gt_dir)
    assert [r["case"] for r in res.rows] == ["case_00001"]
    assert res.unmatched_gt == []  # the other gt cases were not asked for


def test_mismatched_grid_and_unreadable_become_error_rows(dataset, tmp_path):
    pred_dir, gt_dir, _, gts = dataset
    # case_00001: one slice fewer (a really different grid); case_00000: garbage bytes
    save_kits(pred_dir / "case_00001.nii.gz", gts["case_00001"][:-1])
    (pred_dir / "case_00000.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    res = evaluate(pred_dir, gt_dir, out_dir=out)
    status = {r["case"]: r["status"] for r in res.rows}
    assert status == {"case_00000": "error", "case_00001": "error", "case_00002": "ok"}
    by_case = {r["case"]: r for r in res.rows}
    assert "GridMismatchError" in by_case["case_00001"]["message"]
    assert by_case["case_00000"]["message"]
    assert math.isnan(by_case["case_00001"]["dice_tumor"])
    assert res.n_errors == 2
    assert not res.ok
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert summary["n_errors"] == 2
    assert summary["n_evaluated"] == 1
    assert {e["case"] for e in summary["errors"]} == {"case_00000", "case_00001"}
    assert summary["metrics"]["dice_kidney_tumor"]["n"] == 1
    with (out / "per_case.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["case_00000", "case_00001", "case_00002"]
    err = next(r for r in rows if r["case"] == "case_00001")
    assert err["status"] == "error"
    assert err["dice_tumor"] == ""
    assert "GridMismatch" in err["message"]


def test_different_spacing_same_shape_is_an_error_row(tmp_path):
    lab = phantom(2)
    save_kits(tmp_path / "gt" / "case_00002.nii.gz", lab)
    save_kits(tmp_path / "pred" / "case_00002.nii.gz", lab, spacing=(2.0, 0.8, 0.7))
    save_kits(tmp_path / "gt" / "case_00005.nii.gz", lab)
    save_kits(tmp_path / "pred" / "case_00005.nii.gz", lab)
    res = evaluate(tmp_path / "pred", tmp_path / "gt")
    assert [r["status"] for r in res.rows] == ["error", "ok"]
    assert res.rows[1]["dice_kidney_tumor"] == 1.0


def test_outputs_csv_and_summary(dataset, tmp_path):
    pred_dir, gt_dir, _, _ = dataset
    out = tmp_path / "results" / "nested"
    res = evaluate(pred_dir, gt_dir, out_dir=out, tolerance_mm=1.0)
    assert res.csv_path == out / "per_case.csv"
    assert res.summary_path == out / "summary.json"
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv", "summary.json"]  # no temporaries
    with res.csv_path.open() as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert tuple(header) == COLUMNS
    assert len(body) == 3  # one row per matched case
    no_tumor = dict(zip(header, body[1], strict=True))
    assert no_tumor["hd95_tumor_mm"] == "nan"  # undefined, written as nan in evaluated rows
    assert float(no_tumor["dice_tumor"]) == 0.0
    assert float(dict(zip(header, body[0], strict=True))["dice_kidney_tumor"]) == 1.0

    def refuse(token):
        raise AssertionError(f"summary.json holds {token}, which is not JSON")

    summary = json.loads(res.summary_path.read_text(), parse_constant=refuse)
    assert summary["empty_mask_rule"] == EMPTY_MASK_RULE
    assert summary["tolerance_mm"] == 1.0
    assert summary["n_cases"] == 3
    assert summary["n_errors"] == 0
    assert summary["unmatched"]["pred_only"] == [str(pred_dir / "case_00099.nii.gz")]
    assert len(summary["unmatched"]["gt_only"]) == 1
    assert set(summary["metrics"]) == set(METRIC_NAMES)
    for stats in summary["metrics"].values():
        assert set(stats) == {"mean", "median", "std", "min", "max", "n", "n_undefined"}
        assert stats["n"] + stats["n_undefined"] == 3
    dice_kt = [r["dice_kidney_tumor"] for r in res.rows]
    assert summary["metrics"]["dice_kidney_tumor"]["mean"] == pytest.approx(np.mean(dice_kt))
    assert summary["metrics"]["dice_kidney_tumor"]["std"] == pytest.approx(np.std(dice_kt))


def test_tumor_counts_per_case_and_pooled(dataset, tmp_path):
    """Each phantom has one tumor box: found when perfect or shifted, missed when called kidney."""
    pred_dir, gt_dir, _, _ = dataset
    res = evaluate(pred_dir, gt_dir, out_dir=tmp_path / "out")
    counts = {r["case"]: (r["tumors_gt"], r["tumors_found"], r["tumors_false_positive"]) for r in res.rows}
    assert counts == {"case_00000": (1, 1, 0), "case_00001": (1, 0, 0), "case_00002": (1, 1, 0)}
    overall = json.loads((tmp_path / "out" / "summary.json").read_text())["lesions"]["overall"]
    assert overall["tumors_gt"] == 3
    assert overall["sensitivity"] == pytest.approx(2 / 3)
    assert overall["false_positives_per_case"] == 0.0
    # an 18-voxel box of 3 x 0.8 x 0.7 mm: d = (6 * 18 * 1.68 / pi)^(1/3) = 3.87 mm
    (tumor,) = res.rows[1]["lesions"].gt
    assert tumor.diameter_mm == pytest.approx((6 * 18 * 1.68 / math.pi) ** (1 / 3))
    assert tumor.size_class == "<=20mm"


def test_workers_do_not_change_the_result(dataset):
    pred_dir, gt_dir, _, _ = dataset
    r1 = evaluate(pred_dir, gt_dir, workers=1)
    r2 = evaluate(pred_dir, gt_dir, workers=2)
    assert len(r1.rows) == len(r2.rows) == 3
    assert all(rows_equal(a, b) for a, b in zip(r1.rows, r2.rows, strict=True))
    assert json.dumps(r1.summary, sort_keys=True) == json.dumps(r2.summary, sort_keys=True)


def test_progress_callback_sees_every_case(dataset):
    pred_dir, gt_dir, _, _ = dataset
    seen = []
    evaluate(pred_dir, gt_dir, progress=lambda row: seen.append(row["case"]))
    assert sorted(seen) == ["case_00000", "case_00001", "case_00002"]


def test_input_errors(tmp_path, dataset):
    pred_dir, gt_dir, _, _ = dataset
    with pytest.raises(InputNotFoundError, match="does not exist"):
        evaluate(tmp_path / "nope", gt_dir)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        evaluate(pred_dir, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(InputNotFoundError, match="no NIfTI"):
        evaluate(empty, gt_dir)
    other = tmp_path / "other"
    save_kits(other / "case_00500.nii.gz", phantom(0))
    with pytest.raises(DatasetError, match="no case names in common"):
        evaluate(other, gt_dir)
    with pytest.raises(ValueError, match="workers"):
        evaluate(pred_dir, gt_dir, workers=0)


def test_duplicate_case_names_are_refused(tmp_path):
    lab = phantom(0)
    save_kits(tmp_path / "gt" / "case_00000.nii.gz", lab)
    save_kits(tmp_path / "pred" / "case_00000.nii.gz", lab)
    save_kits(tmp_path / "pred" / "case_00000.nii", lab)
    with pytest.raises(DatasetError, match="case_00000"):
        evaluate(tmp_path / "pred", tmp_path / "gt")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_ok_writes_and_exits_zero(dataset, tmp_path, capsys):
    pred_dir, gt_dir, _, _ = dataset
    out = tmp_path / "cli_out"
    main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(out), "--workers", "2", "--tolerance-mm", "1.5"])
    text = capsys.readouterr().out
    assert "case_00002" in text
    assert "dice_kidney_tumor" in text
    assert "case_00099" in text  # unmatched listed on the terminal
    assert "per_case.csv" in text
    assert "summary.json" in text
    assert json.loads((out / "summary.json").read_text())["tolerance_mm"] == 1.5


def test_cli_batch_failure_exit_code(dataset, tmp_path, capsys):
    pred_dir, gt_dir, _, gts = dataset
    save_kits(pred_dir / "case_00001.nii.gz", gts["case_00001"][:, :-2])
    out = tmp_path / "cli_out"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(out)])
    assert exc.value.code == EXIT_BATCH_FAILED
    captured = capsys.readouterr()
    assert "1 of 3" in captured.err
    with (out / "per_case.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3  # written even though a case failed


def test_cli_missing_path_exit_code(tmp_path, dataset, capsys):
    _, gt_dir, _, _ = dataset
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "missing"), str(gt_dir)])
    assert exc.value.code == InputNotFoundError.exit_code
    assert "does not exist" in capsys.readouterr().err


def test_cli_infinite_tolerance_is_one_option_error_line(dataset, tmp_path, capsys):
    """``--tolerance-mm inf`` passes click's ``min=0`` but not ``evaluate``'s own check, which raised a
    plain ValueError: the user saw a traceback and exit 1. Now it is an option error (2), one line."""
    pred_dir, gt_dir, _, _ = dataset
    out = tmp_path / "cli_out"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(out), "--tolerance-mm", "inf"])
    assert exc.value.code == InvalidOptionError.exit_code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: --tolerance-mm must be a finite number"), err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.skipif(not KITS_LABELS.is_dir(), reason="needs ../shared/data/kits19-labels")
def test_real_kits19_labels_match_plain_numpy(tmp_path):
    from scipy import ndimage

    files = sorted(KITS_LABELS.glob("case_*.nii.gz"), key=lambda p: (p.stat().st_size, p.name))[:3]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    expected = {}
    for f, kind in zip(files, ("erode", "shift", "drop_tumor"), strict=True):
        img = nib.load(f)
        gt = np.asarray(img.dataobj).astype(np.uint8)  # stored array layout, no reorientation
        (gt_dir / f.name).symlink_to(f)
        if kind == "erode":
            kidney = ndimage.binary_erosion(gt == 1, iterations=2)
            pred = np.where(gt == 2, 2, np.where(kidney, 1, 0)).astype(np.uint8)
        elif kind == "shift":
            pred = np.roll(gt, (1, 3, -4), axis=(0, 1, 2))
        else:  # drop the tumor: it becomes kidney
            pred = np.where(gt == 2, 1, gt).astype(np.uint8)
        out_img = nib.Nifti1Image(pred, img.affine, img.header)
        out_img.set_data_dtype(np.uint8)
        if kind == "drop_tumor":  # also stored the other way round: RAS (x, y, z), as converters write
            out_img = nib.as_closest_canonical(out_img)
            assert nib.aff2axcodes(out_img.affine) == ("R", "A", "S")
        nib.save(out_img, pred_dir / f.name)
        expected[f.name.removesuffix(".nii.gz")] = (np_dice(pred > 0, gt > 0), np_dice(pred == 2, gt == 2))
    kt_expected = [kt for kt, _ in expected.values()]
    assert sum(0.5 < kt < 0.999 for kt in kt_expected) == 2  # erosion and shift really perturb
    res = evaluate(pred_dir, gt_dir, out_dir=tmp_path / "out", workers=2)
    assert [r["case"] for r in res.rows] == sorted(expected)
    for row in res.rows:
        assert row["status"] == "ok", row["message"]
        kt, tu = expected[row["case"]]
        assert abs(row["dice_kidney_tumor"] - kt) <= 1e-6
        assert abs(row["dice_tumor"] - tu) <= 1e-6
        assert row["tumors_gt"] >= 1  # every KiTS19 case has a tumor
    erode, shift, drop = (r for r in sorted(res.rows, key=lambda r: list(expected).index(r["case"])))
    assert erode["tumors_found"] == erode["tumors_gt"]  # tumor voxels untouched
    assert erode["tumors_false_positive"] == 0
    assert (drop["tumors_found"], drop["tumors_false_positive"]) == (0, 0)  # tumor called kidney
    with (tmp_path / "out" / "per_case.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(files)

    # the empty prediction, on the smallest file
    f = files[0]
    img = nib.load(f)
    empty = nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header)
    nib.save(empty, tmp_path / f.name)
    (row,) = evaluate(tmp_path / f.name, f).rows
    assert row["dice_kidney_tumor"] == 0.0
    assert row["dice_tumor"] == 0.0
    assert math.isnan(row["hd95_kidney_tumor_mm"])
