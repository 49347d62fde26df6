"""The seed paper's loss (1 - lambda) * BCE + lambda * Dice on logits, and the pooled validation Dice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kitsseg.training.losses import DICE_SMOOTH, bce_dice_loss, dice_counts, dice_from_counts, soft_dice_loss


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1, 8, 8, generator=g) * 3
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.7).float()
    return logits, target


def test_soft_dice_matches_hand_computation() -> None:
    logits, target = _batch()
    p = torch.sigmoid(logits)
    expected = 1 - (2 * (p * target).sum() + DICE_SMOOTH) / (p.sum() + target.sum() + DICE_SMOOTH)
    assert torch.allclose(soft_dice_loss(logits, target), expected)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_loss_is_the_weighted_sum(lam: float) -> None:
    logits, target = _batch(1)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    expected = (1 - lam) * bce + lam * soft_dice_loss(logits, target)
    assert torch.allclose(bce_dice_loss(logits, target, lam), expected)


def test_loss_prefers_the_right_answer_and_is_stable_for_extreme_logits() -> None:
    _, target = _batch(2)
    right = (target * 2 - 1) * 30.0
    wrong = -right
    assert bce_dice_loss(right, target) < 0.01
    assert bce_dice_loss(wrong, target) > 1.0
    huge = bce_dice_loss(right * 1000, target)
    assert math.isfinite(float(huge))


def test_loss_gradient_flows_and_fp16_logits_are_handled() -> None:
    logits, target = _batch(3)
    logits = logits.to(torch.float16).requires_grad_()
    loss = bce_dice_loss(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad.float()).all()


def test_dice_weight_out_of_range() -> None:
    logits, target = _batch()
    with pytest.raises(ValueError, match="dice_weight"):
        bce_dice_loss(logits, target, 1.5)


def test_dice_counts_pool_over_batches() -> None:
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 voxels
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, :2, :1] = 5  # 2 right
    logits[1, 0, 3, 3] = 5  # 1 false positive on an empty slice
    counts = dice_counts(logits, target)
    assert counts.tolist() == [2.0, 3.0, 4.0]
    assert dice_from_counts(counts) == pytest.approx(2 * 2 / 7)
    assert dice_from_counts(counts + dice_counts(logits, target)) == pytest.approx(2 * 2 / 7)
    assert dice_from_counts(torch.zeros(3, dtype=torch.float64)) == 1.0
    # threshold: strictly above 0.5, like inference
    assert dice_counts(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).tolist() == [0.0, 0.0, 4.0]
