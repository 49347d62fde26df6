"""The README's main job: the shipped weights segment the shipped example CT offline and find both kidneys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kitsseg.inference.example import example_ct_path
from kitsseg.io.load import load_labels

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
_TS_LABELS = SHARED_DATA / "real-ct" / "example_ct_seg_v1_blob18e85b3.nii.gz"
#: TotalSegmentator v1 label numbers in that file.
_TS_KIDNEY_RIGHT, _TS_KIDNEY_LEFT, _TS_BLADDER = 2, 3, 104


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``kitsseg segment "$(kitsseg example)"`` with the default weights, offline, as a user runs it."""
    out = tmp_path_factory.mktemp("example") / "example_mask.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "kitsseg", "segment", str(example_ct_path()), "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KITSSEG_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(out.with_name("example_mask.json").read_text())


@pytest.mark.slow
def test_example_finds_a_kidney_on_each_side_at_one_level(example_run: tuple[Path, dict]) -> None:
    out, report = example_run
    sides = report["sides"]
    assert sides["right"]["total_ml"] > 10.0
    assert sides["left"]["total_ml"] > 10.0
    labels = load_labels(out).data
    n_cols = labels.shape[2]
    right_z = np.flatnonzero(labels[:, :, : n_cols // 2].any(axis=(1, 2)))
    left_z = np.flatnonzero(labels[:, :, n_cols // 2 :].any(axis=(1, 2)))
    assert right_z.size
    assert left_z.size
    assert right_z[0] <= left_z[-1]  # both kidneys share slices
    assert left_z[0] <= right_z[-1]
    # Two kidneys, not one midline blob split by the volume report (the bladder, before the pair rule).
    # A kidney may be kept as several pieces along z (slice-gap bridging), but none crosses the midline.
    from scipy import ndimage

    components, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), dtype=bool))
    assert n >= 2
    for box in ndimage.find_objects(components):
        assert box[2].stop <= n_cols // 2 or box[2].start >= n_cols // 2
    assert report["weights"]["name"] == "kitsseg-starter"


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not _TS_LABELS.is_file(), reason="needs ../shared/data/real-ct")
def test_example_keeps_the_kidneys_and_not_the_bladder(example_run: tuple[Path, dict]) -> None:
    """Against TotalSegmentator's labels of the example: voxels in both kidneys, none in the bladder."""
    out, _ = example_run
    ours = load_labels(out).data > 0
    ts = load_labels(_TS_LABELS).data
    assert np.count_nonzero(ours & (ts == _TS_KIDNEY_RIGHT)) > 100
    assert np.count_nonzero(ours & (ts == _TS_KIDNEY_LEFT)) > 100
    assert np.count_nonzero(ours & (ts == _TS_BLADDER)) == 0
