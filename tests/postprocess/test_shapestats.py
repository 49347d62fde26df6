"""The tumor shape statistics on tiny label datasets with known ratios, and once on the KiTS19 labels."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from kitsseg.cli import main
from kitsseg.errors import EXIT_BATCH_FAILED, DatasetError, InputNotFoundError, InvalidImageError
from kitsseg.io.save import write_frame
from kitsseg.postprocess.shapestats import find_label_files, shape_stats, tumor_ratios, write_json

SHARED_LABELS = Path(__file__).resolve().parents[3] / "shared" / "data" / "kits19-labels"


def ellipsoid(shape, centre, semi_axes) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, semi_axes, strict=True)) <= 1.0


SHAPE = (24, 40, 40)


def case_round() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A round tumor (ratio 1 in voxels and mm) in a kidney, plus a 3-voxel speck."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[ellipsoid(SHAPE, (12, 20, 20), (10, 14, 14))] = 1
    labels[ellipsoid(SHAPE, (12, 20, 20), (7, 7, 7))] = 2
    labels[2, 2, 2:5] = 2
    return labels, (1.0, 1.0, 1.0)


def case_flat() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A tumor with voxel semi-axes (4, 8, 4) on 2 mm slices: ratio 4 in voxels, 1 in mm;
    and a 6 x 6 x 20 voxel box, whose variances are exactly (n**2 - 1) / 12 per axis: ratio 399 / 35 in
    voxels, 399 / (4 * 35) in mm."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[ellipsoid(SHAPE, (6, 12, 10), (4, 8, 4))] = 2
    labels[14:20, 28:34, 10:30] = 2
    return labels, (2.0, 1.0, 1.0)


def write_dataset(root: Path, layout: str = "kits19", nested: bool = True) -> Path:
    for i, (labels, spacing) in enumerate((case_round(), case_flat())):
        if nested:
            path = root / f"case_{i:05d}" / "segmentation.nii.gz"
            path.parent.mkdir(parents=True)
        else:
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"case_{i:05d}.nii.gz"
        write_frame(labels, path, spacing=spacing, layout=layout)
    return root


def test_tumor_ratios_on_arrays():
    labels, spacing = case_flat()
    ratios, voxels, ignored = tumor_ratios(labels, spacing)
    assert ignored == 0
    assert len(ratios) == 2
    assert ratios[0] == pytest.approx(4.0, rel=0.06)
    assert ratios[1] == pytest.approx(399 / 35)
    mm, _, _ = tumor_ratios(labels, spacing, unit="mm")
    assert mm[0] == pytest.approx(1.0, abs=0.08)
    assert mm[1] == pytest.approx(399 / 140)
    largest, largest_voxels, _ = tumor_ratios(labels, spacing, largest_only=True)
    assert voxels[1] == 720 > voxels[0]
    assert largest == [ratios[1]]
    assert largest_voxels == [720]
    round_labels, _ = case_round()
    ratios, voxels, ignored = tumor_ratios(round_labels, min_voxels=10)
    assert ignored == 1  # the speck
    assert ratios == [pytest.approx(1.0, abs=0.02)]
    assert tumor_ratios(np.zeros(SHAPE, np.uint8)) == ([], [], 0)


@pytest.mark.parametrize(("layout", "nested"), [("kits19", True), ("ras", False)])
def test_shape_stats_folder(tmp_path, layout, nested):
    root = write_dataset(tmp_path / "data", layout=layout, nested=nested)
    if nested:  # an imaging file beside the labels must not be read as labels
        (root / "case_00000" / "imaging.nii.gz").write_bytes(b"not a label file")
    stats = shape_stats(root)
    assert [c.case for c in stats.cases] == ["case_00000", "case_00001"]
    assert stats.n_components == 3
    assert stats.cases[0].n_ignored == 1
    assert sorted(stats.ratios) == [
        pytest.approx(1.0, abs=0.02),
        pytest.approx(4.0, rel=0.06),
        pytest.approx(399 / 35),
    ]
    expected = np.percentile(stats.ratios, [5, 25, 50, 75, 95])
    assert list(stats.percentiles.values()) == pytest.approx(list(expected))
    assert stats.bounds == (pytest.approx(expected[0]), pytest.approx(expected[4]))
    mm = shape_stats(root, unit="mm")
    assert sorted(mm.ratios) == [
        pytest.approx(1.0, abs=0.08),
        pytest.approx(1.0, abs=0.08),
        pytest.approx(399 / 140),
    ]


def test_workers_do_not_change_results(tmp_path):
    root = write_dataset(tmp_path / "data")
    one = shape_stats(root, workers=1).to_dict()
    two = shape_stats(root, workers=2).to_dict()
    assert one == two


def test_json_output(tmp_path):
    root = write_dataset(tmp_path / "data")
    # a degenerate tumor (a straight line) has an infinite ratio: JSON gets null, never Infinity
    line = np.zeros(SHAPE, dtype=np.uint8)
    line[5, 5, 5:25] = 2
    write_frame(line, root / "case_00002" / "segmentation.nii.gz", spacing=(1.0, 1.0, 1.0))
    stats = shape_stats(root, largest_only=True)
    out = write_json(stats, tmp_path / "stats.json")
    data = json.loads(out.read_text())
    assert data["unit"] == "voxel"
    assert data["n_cases"] == 3
    assert data["n_components"] == 3
    assert data["n_degenerate"] == 1
    assert data["largest_only"] is True
    assert set(data["percentiles"]) == {"5", "25", "50", "75", "95"}
    assert data["p5_p95"][0] == pytest.approx(stats.bounds[0])
    assert data["p5_p95"][1] is None  # the 95th percentile reaches the infinite ratio
    assert data["per_case"][2]["ratios"] == [None]
    assert data["per_case"][1]["n_components"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "stats.json"]  # no temporary left


def test_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        find_label_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no label files"):
        shape_stats(tmp_path / "empty")
    with pytest.raises(ValueError, match="unit"):
        shape_stats(tmp_path / "empty", unit="inch")  # type: ignore[arg-type]


def test_cli_stats(tmp_path, capsys):
    root = write_dataset(tmp_path / "data")
    out = tmp_path / "stats.json"
    main(["stats", str(root), "--unit", "mm", "--min-voxels", "5", "-o", str(out), "--workers", "1"])
    text = capsys.readouterr().out
    assert "95th" in text
    assert "mm units" in text
    assert "1 components under 5 voxels ignored" in text
    data = json.loads(out.read_text())
    assert data["unit"] == "mm"
    assert data["min_voxels"] == 5
    assert data["n_components"] == 3


def _add_bad_case(root: Path) -> Path:
    """A case file that is not a NIfTI at all, sorted between the two good ones."""
    bad = root / "case_00000b" / "segmentation.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_text("not an image")
    return bad


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_file_raises_or_is_skipped(tmp_path, workers):
    good = shape_stats(write_dataset(tmp_path / "good"), workers=workers).to_dict()
    root = write_dataset(tmp_path / "data")
    bad = _add_bad_case(root)
    with pytest.raises(InvalidImageError, match="not a readable NIfTI"):
        shape_stats(root, workers=workers)  # the library default: the first bad file raises
    seen: list[str] = []
    stats = shape_stats(root, workers=workers, skip_failed=True, on_failure=lambda p, e: seen.append(p))
    assert seen == [str(bad)]
    assert [p for p, _ in stats.failed] == [str(bad)]
    assert "not a readable NIfTI" in stats.failed[0][1]
    data = stats.to_dict()
    assert data["n_failed"] == 1
    assert data["failed"][0]["path"] == str(bad)
    # the statistics of the other files are exactly those of the folder without the bad one
    for key in ("n_cases", "n_components", "percentiles", "p5_p95"):
        assert data[key] == good[key]


def test_cli_stats_reads_past_a_bad_file_and_exits_12(tmp_path, capsys):
    root = write_dataset(tmp_path / "data")
    bad = _add_bad_case(root)
    out = tmp_path / "stats.json"
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(root), "-o", str(out)])
    assert exc.value.code == EXIT_BATCH_FAILED
    captured = capsys.readouterr()
    assert "95th" in captured.out  # the table of the two good cases is shown
    assert "failed:" in captured.out + captured.err
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1
    assert "1 of 3 label files could not be read" in err[0]
    assert "other 2" in err[0]
    data = json.loads(out.read_text())
    assert data["n_cases"] == 2
    assert data["n_failed"] == 1
    assert data["failed"][0]["path"] == str(bad)


def test_cli_stats_of_only_bad_files_writes_nothing(tmp_path, capsys):
    root = tmp_path / "data"
    _add_bad_case(root)
    out = tmp_path / "stats.json"
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(root), "-o", str(out)])
    assert exc.value.code == EXIT_BATCH_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1
    assert "none of the 1 label files could be read" in err[0]
    assert not out.exists()


def test_cli_stats_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(tmp_path / "nope")])
    assert exc.value.code == InputNotFoundError.exit_code
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_LABELS.is_dir(), reason="needs ../shared/data/kits19-labels")
def test_kits19_labels_reproduce_paper_bounds():
    """The paper's 1.07-2.8 (1.07-2.79 with the covariance of voxel-index coordinates)."""
    start = time.perf_counter()
    stats = shape_stats(SHARED_LABELS, workers=2)
    elapsed = time.perf_counter() - start
    lo, hi = stats.bounds
    n = stats.n_components
    print(f"KiTS19 eigenvalue ratio p5-p95: {lo:.4f}-{hi:.4f} ({n} components, {elapsed:.0f} s)")
    assert len(stats.cases) == len(list(SHARED_LABELS.glob("*.nii.gz")))
    assert lo == pytest.approx(1.07, abs=0.03)
    assert hi == pytest.approx(2.79, abs=0.03)
    assert math.isfinite(hi)
