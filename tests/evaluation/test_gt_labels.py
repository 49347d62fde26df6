"""evaluate and label values: unexpected values become error rows, ``--gt-labels kits23`` reads KiTS21/23.

The scene is a row of voxels along the columns of one slice, so every Dice is a count of voxels that can
be checked by hand (the comments give the counts).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsseg.cli import main
from kitsseg.errors import EXIT_BATCH_FAILED, InvalidOptionError
from kitsseg.evaluation.evaluate import COLUMNS, KITS23_COLUMNS, evaluate
from kitsseg.evaluation.labelsets import KITS23_METRIC_NAMES, unexpected_values

SHAPE = (3, 3, 20)  # (z, row, col); the scene lies on voxels [1, 1, 0:20]
SPACING = (2.0, 1.0, 1.0)

# Column ranges of the scene (ground truth in KiTS23 labels):
#   gt   : 0-7 kidney (1), 8-11 tumor (2), 12-15 cyst (3), 16-19 background
#   pred : 0-5 kidney, 6-7 missed, 8-11 tumor, 12-13 kidney (cyst called kidney), 14-15 tumor (cyst called
#          tumor), 16-19 background
GT_ROW = [1] * 8 + [2] * 4 + [3] * 4 + [0] * 4
PRED_ROW = [1] * 6 + [0] * 2 + [2] * 4 + [1] * 2 + [2] * 2 + [0] * 4

# By hand, with cysts counted as kidney (gt kidney = 0-7 and 12-15, 12 voxels; gt tumor = 8-11, 4 voxels):
#   kidney      : pred 1 = 0-5, 12-13 (8 voxels), all inside gt kidney -> 2*8 / (8+12) = 0.8
#   tumor       : pred 2 = 8-11, 14-15 (6), overlap 8-11 (4)          -> 2*4 / (6+4)  = 0.8
#   kidney_tumor: pred > 0 = 14 voxels, gt > 0 = 16, overlap 14        -> 28 / 30
# KiTS23 regions on the original labels:
#   kidney_masses: as kidney_tumor                                      -> 28 / 30
#   masses       : gt 2|3 = 8-15 (8), pred 2 (6), overlap 6             -> 12 / 14
#   tumor        : gt 2 (4), pred 2 (6), overlap 4                      -> 8 / 10
PLAIN_ROW = [0, 0] + [1] * 10 + [2] * 3 + [0] * 5  # a KiTS19 case without cyst

EXPECTED_KITS19 = {"dice_kidney": 0.8, "dice_tumor": 0.8, "dice_kidney_tumor": 28 / 30}
EXPECTED_KITS23 = {
    "dice_kits23_kidney_masses": 28 / 30,
    "dice_kits23_masses": 12 / 14,
    "dice_kits23_tumor": 0.8,
}


def scene(row: list[int]) -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[1, 1, :] = row
    return lab


def save(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(labels.astype(np.uint8), np.diag([*SPACING[::-1], 1.0]))
    nib.save(img, path)
    return path


@pytest.fixture
def cyst_dataset(tmp_path):
    """case_00000: KiTS23 ground truth with a cyst; case_00001: plain KiTS19 labels, predicted perfectly."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    save(gt_dir / "case_00000" / "segmentation.nii.gz", scene(GT_ROW))
    save(pred_dir / "case_00000.nii.gz", scene(PRED_ROW))
    plain = scene(PLAIN_ROW)
    save(gt_dir / "case_00001" / "segmentation.nii.gz", plain)
    save(pred_dir / "case_00001.nii.gz", plain)
    return pred_dir, gt_dir


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_unexpected_values_names_only_the_values_outside():
    assert unexpected_values(np.array([0, 1, 2, 2, 1], np.uint8), (0, 1, 2)) == []
    assert unexpected_values(np.array([0, 3, 1, 7, 3], np.uint8), (0, 1, 2)) == [3, 7]
    assert unexpected_values(np.array([0, 3, 1, 2], np.uint8), (0, 1, 2, 3)) == []


def test_cyst_in_gt_without_option_is_an_error_row_and_others_are_scored(cyst_dataset, tmp_path):
    pred_dir, gt_dir = cyst_dataset
    res = evaluate(pred_dir, gt_dir, out_dir=tmp_path / "out")
    bad, good = res.rows
    assert bad["status"] == "error"
    assert "ground truth" in bad["message"]
    assert "label values 3 (expected 0, 1, 2)" in bad["message"]
    assert "--gt-labels kits23" in bad["message"]
    assert good["status"] == "ok", good["message"]
    assert good["dice_kidney_tumor"] == 1.0
    assert res.n_errors == 1
    header, rows = read_csv(tmp_path / "out" / "per_case.csv")
    assert tuple(header) == COLUMNS  # no KiTS23 columns by default
    assert rows[0]["status"] == "error"
    assert "--gt-labels kits23" in rows[0]["message"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gt_labels"] == "kits19"
    assert summary["n_evaluated"] == 1
    assert not set(KITS23_METRIC_NAMES) & set(summary["metrics"])


def test_kits23_counts_cysts_as_kidney_and_adds_the_kits23_regions(cyst_dataset, tmp_path):
    pred_dir, gt_dir = cyst_dataset
    out = tmp_path / "out"
    res = evaluate(pred_dir, gt_dir, out_dir=out, gt_labels="kits23")
    assert res.ok, res.errors
    row = res.rows[0]
    for key, value in {**EXPECTED_KITS19, **EXPECTED_KITS23}.items():
        assert row[key] == pytest.approx(value, abs=1e-12), key
    # volumes: the cyst's 4 voxels are kidney (gt kidney 12 voxels of 2 mm^3)
    assert row["vol_gt_kidney_ml"] == pytest.approx(12 * 2.0 / 1000)
    # the cyst called tumor (14-15) touches no gt tumor: a false positive, not a found tumor
    assert (row["tumors_gt"], row["tumors_found"], row["tumors_false_positive"]) == (1, 1, 1)
    perfect = res.rows[1]
    assert all(perfect[k] == 1.0 for k in KITS23_METRIC_NAMES)

    header, rows = read_csv(out / "per_case.csv")
    assert tuple(header) == KITS23_COLUMNS
    assert set(KITS23_METRIC_NAMES) <= set(header)
    for key, value in EXPECTED_KITS23.items():
        assert float(rows[0][key]) == pytest.approx(value, abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gt_labels"] == "kits23"
    for key, value in EXPECTED_KITS23.items():
        assert summary["metrics"][key]["mean"] == pytest.approx((value + 1.0) / 2)
        assert summary["metrics"][key]["n"] == 2
        assert key in summary["definitions"]
    assert summary["metrics"]["dice_kidney"]["mean"] == pytest.approx((0.8 + 1.0) / 2)


def test_kits23_gt_is_not_modified(cyst_dataset):
    pred_dir, gt_dir = cyst_dataset
    gt_file = gt_dir / "case_00000" / "segmentation.nii.gz"
    before = gt_file.read_bytes()
    evaluate(pred_dir, gt_dir, gt_labels="kits23")
    assert gt_file.read_bytes() == before


def test_prediction_value_5_is_an_error_row_naming_it(cyst_dataset):
    pred_dir, gt_dir = cyst_dataset
    pred = scene(PLAIN_ROW)
    pred[1, 1, 0] = 5
    save(pred_dir / "case_00001.nii.gz", pred)
    res = evaluate(pred_dir, gt_dir, gt_labels="kits23")
    ok, err = res.rows
    assert ok["status"] == "ok", ok["message"]
    assert err["status"] == "error"
    assert "prediction" in err["message"]
    assert "label values 5 (expected 0, 1, 2" in err["message"]
    assert "has label values" in err["message"].split("prediction", 1)[1]
    assert err["message"].count("has label values") == 1  # only the prediction is blamed


def test_kits23_still_refuses_values_above_3(cyst_dataset):
    pred_dir, gt_dir = cyst_dataset
    gt = scene(GT_ROW)
    gt[1, 1, 19] = 4
    save(gt_dir / "case_00000" / "segmentation.nii.gz", gt)
    res = evaluate(pred_dir, gt_dir, gt_labels="kits23")
    assert res.rows[0]["status"] == "error"
    assert "label values 4 (expected 0, 1, 2, 3)" in res.rows[0]["message"]
    assert res.rows[1]["status"] == "ok"


def test_library_refuses_an_unknown_gt_labels(cyst_dataset):
    pred_dir, gt_dir = cyst_dataset
    with pytest.raises(InvalidOptionError, match="kits19, kits23"):
        evaluate(pred_dir, gt_dir, gt_labels="kits21")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_cyst_without_option_exits_12_with_the_hint(cyst_dataset, tmp_path, capsys):
    pred_dir, gt_dir = cyst_dataset
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(out)])
    assert exc.value.code == EXIT_BATCH_FAILED
    captured = capsys.readouterr()
    flat = " ".join(captured.out.split())  # rich may wrap the message
    assert "label values 3 (expected 0, 1, 2)" in flat
    assert "--gt-labels kits23" in flat
    assert "1 of 2" in captured.err
    _, rows = read_csv(out / "per_case.csv")
    assert [r["status"] for r in rows] == ["error", "ok"]


def test_cli_gt_labels_kits23_scores_every_case(cyst_dataset, tmp_path, capsys):
    pred_dir, gt_dir = cyst_dataset
    out = tmp_path / "cli"
    main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(out), "--gt-labels", "kits23"])
    text = capsys.readouterr().out
    assert "dice_kits23_masses" in text  # the summary table lists the KiTS23 regions
    header, rows = read_csv(out / "per_case.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert float(rows[0]["dice_kits23_masses"]) == pytest.approx(12 / 14)
    assert float(rows[0]["dice_kidney"]) == pytest.approx(0.8)


def test_cli_refuses_an_invalid_gt_labels(cyst_dataset, tmp_path, capsys):
    pred_dir, gt_dir = cyst_dataset
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred_dir), str(gt_dir), "-o", str(tmp_path / "x"), "--gt-labels", "kits21"])
    assert exc.value.code == 2
    assert "gt-labels" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
