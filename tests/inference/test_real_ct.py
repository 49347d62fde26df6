"""The default weights on whole real CTs that were never trained on: kidney Dice per side must not regress.

``ircad_01`` is a contrast CT from another institution (3D-IRCADb, hand-drawn kidney masks; validation
only), ``example`` the shipped non-contrast CT against TotalSegmentator's kidney labels. The floors sit a
little under the values measured for the shipped weights in docs/model-card.md
(``python scripts/validate_real_ct.py``), so a change that loses accuracy on real CT fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kitsseg.inference.segment import load_model, segment
from kitsseg.io.load import load_labels

REAL_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-ct"
CASES = {
    "ircad_01": (REAL_CT / "ircad_01" / "ct.nii.gz", REAL_CT / "ircad_01" / "kidney_sides.nii.gz", (1, 2)),
    "example": (REAL_CT / "example_ct.nii.gz", REAL_CT / "example_ct_seg_v1_blob18e85b3.nii.gz", (2, 3)),
}
#: Least kidney Dice (both kidneys, label > 0) with the default weights and options.
FLOORS = {"ircad_01": 0.75, "example": 0.78}


def kidney_dice(pred: np.ndarray, ref: np.ndarray, codes: tuple[int, int]) -> float:
    truth = (ref == codes[0]) | (ref == codes[1])
    p = pred > 0
    return float(2 * (p & truth).sum() / (p.sum() + truth.sum()))


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(CASES))
def test_default_weights_segment_real_ct_from_outside_the_training_data(name: str, tmp_path: Path) -> None:
    ct, ref_path, codes = CASES[name]
    if not ct.exists():
        pytest.skip(f"needs {ct}")
    out = tmp_path / f"{name}.nii.gz"
    result = segment(ct, out, weights=load_model(threads=2))
    dice = kidney_dice(load_labels(out).data, load_labels(ref_path).data, codes)
    assert dice >= FLOORS[name], f"{name}: kidney Dice {dice:.4f} below {FLOORS[name]}"
    assert result.report["kidney_volume_ml"]["right"] > 0
    assert result.report["kidney_volume_ml"]["left"] > 0
