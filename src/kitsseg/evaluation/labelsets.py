"""Which label values ``evaluate`` accepts, and how KiTS21/23 ground truth is read (``--gt-labels``).

kitsseg scores KiTS19 labels (0 background, 1 kidney, 2 tumor). KiTS21 and KiTS23 ground truth adds
3 = cyst, and other tools may write other values; counting a 3 as tumor or as nothing would give a wrong
Dice without any sign of it, so an unexpected value makes the case an error row whose message names the
values, and KiTS21/23 labels are read only when asked for (``gt_labels="kits23"``):

* the KiTS19 regions are scored on the ground truth with cysts counted as kidney (3 -> 1), so
  ``dice_kidney_tumor`` keeps its meaning ("everything kidney") and ``dice_tumor`` stays "tumor only";
* the KiTS23 regions (hierarchical evaluation classes of the KiTS23 challenge) are scored on the
  original labels and reported as extra Dice columns (:data:`KITS23_METRIC_NAMES`). kitsseg predicts no
  cyst class, so on the prediction side "masses" is its tumor label.

The prediction is always held to 0, 1, 2: ``--gt-labels`` describes the ground truth only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InvalidImageError, InvalidOptionError
from .metrics import dice

GtLabels = Literal["kits19", "kits23"]

#: Accepted values of ``gt_labels`` / ``--gt-labels``.
GT_LABEL_SETS: tuple[str, ...] = ("kits19", "kits23")

#: The labels kitsseg predicts and scores (KiTS19).
KITS19_VALUES: tuple[int, ...] = (0, 1, 2)

#: KiTS21/23 ground-truth labels: background, kidney, tumor, cyst.
KITS23_VALUES: tuple[int, ...] = (0, 1, 2, 3)

#: The KiTS21/23 cyst label, counted as kidney by ``gt_labels="kits23"``.
CYST = 3

#: KiTS23 regions: name -> (ground-truth mask from the original KiTS23 labels, prediction mask from
#: kitsseg's KiTS19 labels). kitsseg predicts no cyst, so its masses are its tumors.
KITS23_REGIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "kidney_masses": (lambda gt: gt > 0, lambda pred: pred > 0),
    "masses": (lambda gt: (gt == 2) | (gt == CYST), lambda pred: pred == 2),
    "tumor": (lambda gt: gt == 2, lambda pred: pred == 2),
}

#: Extra per-case columns (and summary metrics) of ``gt_labels="kits23"``.
KITS23_METRIC_NAMES: tuple[str, ...] = tuple(f"dice_kits23_{r}" for r in KITS23_REGIONS)

#: How the KiTS23 columns are defined, for ``summary.json``.
KITS23_DEFINITIONS = {
    "gt_labels kits23": "ground truth read as KiTS21/23 labels (0 background, 1 kidney, 2 tumor, 3 cyst); "
    "cyst (3) counted as kidney (1) for the KiTS19 regions, volumes and tumor counts",
    "dice_kits23_kidney_masses": "Dice of ground truth label > 0 (kidney, tumor, cyst) vs prediction "
    "label > 0",
    "dice_kits23_masses": "Dice of ground truth label 2 or 3 (tumor, cyst) vs prediction label 2 "
    "(kitsseg predicts no cyst class, so its masses are its tumors)",
    "dice_kits23_tumor": "Dice of ground truth label 2 vs prediction label 2",
}

_MAX_NAMED = 10


def check_gt_labels(gt_labels: str) -> GtLabels:
    """``gt_labels`` itself, or :class:`InvalidOptionError` (exit 2) naming the accepted values."""
    if gt_labels == "kits19":
        return "kits19"
    if gt_labels == "kits23":
        return "kits23"
    raise InvalidOptionError(
        f"unknown ground-truth labels {gt_labels!r}; expected one of {', '.join(GT_LABEL_SETS)} "
        "(kits19: 0 background, 1 kidney, 2 tumor; kits23: also 3 cyst, counted as kidney)"
    )


def unexpected_values(labels: np.ndarray, allowed: tuple[int, ...]) -> list[int]:
    """Values of ``labels`` outside ``allowed`` (which must be ``0..k``), sorted; [] when there are none.

    ``load_labels`` gives uint8, so the maximum decides in one pass and a histogram names the values only
    when something is wrong (no sort of the whole volume).
    """
    arr = np.asarray(labels)
    if arr.size == 0 or int(arr.max()) <= max(allowed):
        return []
    counts = np.bincount(arr.ravel().astype(np.intp, copy=False))
    return [int(v) for v in np.flatnonzero(counts) if int(v) not in allowed]


def _names(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_NAMED])
    return shown + (f" and {len(values) - _MAX_NAMED} more" if len(values) > _MAX_NAMED else "")


def value_problems(
    pred: np.ndarray, gt: np.ndarray, pred_file: Path, gt_file: Path, gt_labels: GtLabels
) -> str:
    """What is wrong with the label values of one pair, in words ("" when nothing is): each side names
    its unexpected values, what was expected, and the option that maps them if there is one."""
    problems = []
    allowed_gt = KITS23_VALUES if gt_labels == "kits23" else KITS19_VALUES
    bad_gt = unexpected_values(gt, allowed_gt)
    if bad_gt:
        expected = ", ".join(str(v) for v in allowed_gt)
        if gt_labels == "kits23":
            hint = "KiTS21/23 labels are 0 background, 1 kidney, 2 tumor, 3 cyst: remap other values first"
        elif CYST in bad_gt:
            hint = (
                'pass --gt-labels kits23 (gt_labels="kits23" in Python) to count KiTS21/23 cysts (3) '
                "as kidney"
                + ("" if bad_gt == [CYST] else "; the other values have no mapping: remap them first")
            )
        else:
            hint = "KiTS19 labels are 0 background, 1 kidney, 2 tumor: remap other values first"
        problems.append(
            f"ground truth {gt_file} has label values {_names(bad_gt)} (expected {expected}); {hint}"
        )
    bad_pred = unexpected_values(pred, KITS19_VALUES)
    if bad_pred:
        problems.append(
            f"prediction {pred_file} has label values {_names(bad_pred)} (expected 0, 1, 2: background, "
            "kidney, tumor); --gt-labels maps ground truth only: remap the prediction first"
        )
    return "; ".join(problems)


def check_values(
    pred: np.ndarray, gt: np.ndarray, pred_file: Path, gt_file: Path, gt_labels: GtLabels
) -> None:
    """Raise :class:`InvalidImageError` (an error row in ``evaluate``) when a side holds unexpected values."""
    problems = value_problems(pred, gt, pred_file, gt_file, gt_labels)
    if problems:
        raise InvalidImageError(problems)


def as_kits19(gt: np.ndarray, gt_labels: GtLabels) -> np.ndarray:
    """Ground truth in KiTS19 labels: cysts (3) become kidney (1) for ``kits23``; ``gt`` is not modified."""
    if gt_labels == "kits23":
        return np.where(gt == CYST, np.uint8(1), gt).astype(gt.dtype, copy=False)
    return gt


def kits23_dice(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice of each KiTS23 region (keys :data:`KITS23_METRIC_NAMES`), ``gt`` in original KiTS23 labels.

    The empty-mask rule of :func:`kitsseg.evaluation.metrics.dice` applies (both empty -> NaN).
    """
    return {
        f"dice_kits23_{name}": dice(pred_mask(pred), gt_mask(gt))
        for name, (gt_mask, pred_mask) in KITS23_REGIONS.items()
    }
