"""Tumors as objects on training slices: lesion counts for epoch choice, size-balanced loss weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kitsseg.training.lesions2d import (
    REFERENCE_DIAMETER_MM,
    LesionTally,
    disc_diameter_mm,
    lesion_counts,
    lesion_weights,
)
from kitsseg.training.losses import bce_dice_loss


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_disc_diameter_is_the_diameter_of_the_disc_of_the_same_area() -> None:
    assert float(disc_diameter_mm(100, 1.0)) == pytest.approx(2 * math.sqrt(100 / math.pi))
    assert float(disc_diameter_mm(100, 2.0)) == pytest.approx(2 * float(disc_diameter_mm(100, 1.0)))


def test_counts_found_missed_and_false_positive_regions_by_size() -> None:
    """1 mm pixels: a small tumor (d about 10 mm) missed, a large one (d about 60 mm) covered by exactly 10%
    of its pixels (found: the rule is 'at least'), a mid-size one (d about 30 mm) covered by one pixel less
    than 10% (missed), and two predicted regions that touch no tumor (false positives)."""
    shape = (160, 160)
    small = disc(shape, (20, 20), 5)
    large = disc(shape, (90, 90), 30)
    mid = disc(shape, (30, 130), 15)
    target = small | large | mid
    flat = np.zeros(shape, bool).ravel()
    flat[np.flatnonzero(large.ravel())[: math.ceil(0.1 * large.sum())]] = True
    flat[np.flatnonzero(mid.ravel())[: math.ceil(0.1 * mid.sum()) - 1]] = True
    pred = flat.reshape(shape)
    pred[150:153, 5:8] = True
    pred[5:8, 60:63] = True
    t = lesion_counts(pred, target, pixel_mm=1.0)
    assert t.total == {"<=20mm": 1, "20-40mm": 1, ">40mm": 1}
    assert t.found == {"<=20mm": 0, "20-40mm": 0, ">40mm": 1}
    assert t.false_positive == 2
    assert t.f1 == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))
    # The same arrays as a batch of one slice and as two slices (counts add up per slice).
    both = lesion_counts(np.stack([pred, pred]), np.stack([target, target]), 1.0)
    assert both.total[">40mm"] == 2
    assert both.false_positive == 4
    # The pixel size decides the class: at 0.25 mm the large tumor is 15 mm across.
    assert lesion_counts(pred, target, pixel_mm=0.25).total == {"<=20mm": 3, "20-40mm": 0, ">40mm": 0}


def test_f1_of_nothing_to_find_and_nothing_found_is_one_and_tallies_add() -> None:
    assert LesionTally().f1 == 1.0
    a = lesion_counts(np.zeros((8, 8), bool), disc((8, 8), (4, 4), 2), 1.0)
    assert a.f1 == 0.0
    assert a.total["<=20mm"] == 1
    b = LesionTally()
    b.add(a)
    b.add(a)
    assert b.total["<=20mm"] == 2
    assert b.to_dict() == {
        "<=20mm": "0/2",
        "20-40mm": "0/0",
        ">40mm": "0/0",
        "fp": 0,
    }
    with pytest.raises(ValueError, match="shape"):
        lesion_counts(np.zeros((4, 4), bool), np.zeros((4, 5), bool), 1.0)


def test_weights_give_small_tumors_the_bce_mass_of_a_4_cm_one_capped() -> None:
    """1 mm pixels: a tumor of d = 10 mm gets min(cap, (40/10)^2) on each pixel, one of d >= 40 mm gets 1,
    background 1; a cap of 1 turns the weighting off."""
    shape = (128, 128)
    small = disc(shape, (20, 20), 5)
    large = disc(shape, (80, 80), 25)
    target = torch.from_numpy(np.stack([small | large, np.zeros(shape, bool)])[:, None].astype(np.float32))
    d_small = float(disc_diameter_mm(int(small.sum()), 1.0))
    w = lesion_weights(target, pixel_mm=1.0, max_weight=100.0)
    assert w.shape == target.shape
    assert torch.allclose(
        w[0, 0][torch.from_numpy(small)], torch.tensor((REFERENCE_DIAMETER_MM / d_small) ** 2)
    )
    assert torch.all(w[0, 0][torch.from_numpy(large)] == 1.0)
    assert torch.all(w[0, 0][~torch.from_numpy(small | large)] == 1.0)
    assert torch.all(w[1] == 1.0)
    capped = lesion_weights(target, pixel_mm=1.0, max_weight=5.0)
    assert torch.all(capped[0, 0][torch.from_numpy(small)] == 5.0)
    assert torch.all(lesion_weights(target, 1.0, max_weight=1.0) == 1.0)


def test_pixel_weights_make_a_missed_small_tumor_cost_more_and_ones_change_nothing() -> None:
    target = torch.zeros(1, 1, 32, 32)
    target[0, 0, 10:13, 10:13] = 1.0
    logits = torch.full_like(target, -4.0)  # predicts nothing: the tumor is missed
    plain = bce_dice_loss(logits, target)
    assert torch.allclose(bce_dice_loss(logits, target, pixel_weight=torch.ones_like(target)), plain)
    weighted = bce_dice_loss(logits, target, pixel_weight=lesion_weights(target, 1.0, 10.0))
    assert float(weighted) > float(plain)
