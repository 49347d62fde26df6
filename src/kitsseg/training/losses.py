"""The seed paper's loss, ``(1 - lambda) * BCE + lambda * Dice``, and the validation Dice, on logits.

BCE alone is dominated by the background (a kidney is a few percent of a slice, a tumor far less); the soft
Dice term measures overlap whatever the class balance. The Dice term is pooled over the whole batch rather
than averaged per slice: a slice with an empty target (the tumor model's negatives) then adds only its
false-positive mass to the denominator instead of a per-slice score that is 0 or 1 on a single voxel.
Both terms are computed in float32 from logits (``binary_cross_entropy_with_logits`` is the numerically
stable form), also under mixed precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Additive smoothing of the soft Dice (in voxels): keeps the gradient finite on empty batches.
DICE_SMOOTH = 1.0


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - soft Dice`` of ``sigmoid(logits)`` against ``target``, pooled over the batch."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + t.sum() + smooth)


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float = 0.5,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1 - dice_weight) * BCE + dice_weight * (1 - soft Dice)`` (seed paper, equation 1, lambda = 0.5).

    ``pixel_weight`` (same shape as ``target``) weighs each pixel's BCE term (the mean of ``weight * BCE``);
    the Dice term is unweighted. Used for size-balanced tumor training
    (:func:`kitsseg.training.lesions2d.lesion_weights`).
    """
    if not 0.0 <= dice_weight <= 1.0:
        raise ValueError(f"dice_weight must be in [0, 1], got {dice_weight}")
    bce = F.binary_cross_entropy_with_logits(
        logits.float(), target.float(), weight=None if pixel_weight is None else pixel_weight.float()
    )
    return (1.0 - dice_weight) * bce + dice_weight * soft_dice_loss(logits, target)


def dice_counts(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``[intersection, predicted, target]`` voxel counts of the thresholded prediction (float64).

    Summed over batches (and DDP ranks) they give the pooled hard Dice of a whole validation set; the
    prediction is ``sigmoid(logits) > threshold``, exactly the rule inference applies.
    """
    pred = torch.sigmoid(logits.float()) > threshold
    tgt = target > 0.5
    return torch.stack([(pred & tgt).sum(), pred.sum(), tgt.sum()]).to(torch.float64)


def dice_from_counts(counts: torch.Tensor) -> float:
    """Pooled Dice ``2 |P & T| / (|P| + |T|)``; 1.0 when both are empty (nothing to find, nothing found)."""
    inter, pred, tgt = (float(v) for v in counts.tolist())
    if pred + tgt == 0:
        return 1.0
    return 2.0 * inter / (pred + tgt)
