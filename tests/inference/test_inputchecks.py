"""Input checks: a warning sentence whenever a CT or its result looks unlike what the weights know."""

from __future__ import annotations

import numpy as np

from kitsseg.inference.inputchecks import input_checks

META = {"trained_spacing_mm": [0.4375, 1.041]}


def case(kidney_hu: float) -> tuple[np.ndarray, np.ndarray]:
    ct = np.full((4, 20, 20), 40.0, np.float32)
    labels = np.zeros(ct.shape, np.uint8)
    labels[:, 5:10, 2:7] = 1
    labels[:, 5:10, 13:18] = 1
    ct[labels == 1] = kidney_hu
    return ct, labels


def test_an_ordinary_enhanced_ct_gives_no_warning() -> None:
    ct, labels = case(180.0)
    assert (
        input_checks(ct, labels, int(labels.sum()), (3.0, 0.8, 0.8), {"right": 150.0, "left": 160.0}, META)
        == []
    )


def test_unenhanced_kidneys_are_reported() -> None:
    ct, labels = case(35.0)
    (msg,) = input_checks(
        ct, labels, int(labels.sum()), (3.0, 0.8, 0.8), {"right": 150.0, "left": 160.0}, META
    )
    assert "unenhanced" in msg
    assert "35 HU" in msg


def test_spacing_outside_the_trained_range_is_reported() -> None:
    ct, labels = case(180.0)
    (msg,) = input_checks(
        ct, labels, int(labels.sum()), (3.0, 3.0, 3.0), {"right": 150.0, "left": 160.0}, META
    )
    assert "pixel spacing 3 x 3 mm" in msg


def test_post_processing_removing_most_of_the_output_is_reported() -> None:
    ct, labels = case(180.0)
    msgs = input_checks(
        ct, labels, 10 * int(labels.sum()), (3.0, 0.8, 0.8), {"right": 150.0, "left": 160.0}, META
    )
    assert any("removed more than it kept" in m for m in msgs)


def test_implausible_volumes_and_a_missing_side_are_reported() -> None:
    ct, labels = case(180.0)
    msgs = input_checks(ct, labels, int(labels.sum()), (3.0, 0.8, 0.8), {"right": 12.0, "left": 0.0}, META)
    assert any("no left kidney" in m for m in msgs)
    assert any("right kidney measures 12 mL" in m for m in msgs)
    empty = np.zeros_like(labels)
    assert input_checks(ct, empty, 0, (3.0, 0.8, 0.8), {"right": 0.0, "left": 0.0}, META) == [
        "no kidney was found"
    ]
