"""Training data: KiTS19 folder discovery, the case-level split, and slice sets.

Slices of one patient are strongly correlated, so the train/validation split is drawn over *cases*, never
over slices: a slice-level split would let the validation Dice measure memory of a patient instead of
generalisation. The split is seeded and saved as ``split.json`` in the run folder so that ``--resume`` and
later evaluation see exactly the same cases.

A :class:`SliceSet` is what one training stage consumes: already windowed, already resized 2D slices
``(N, H, W)`` with their masks, either memory-mapped from the slice cache (:mod:`kitsseg.training.slicecache`)
or arrays a script built itself (the starter model is trained from real 2D slices that are not volumes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..io.atomic import write_text_atomic
from ..names import IMAGE_NAMES, LABEL_NAMES

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Case:
    """One labelled case of a KiTS19-layout dataset: ``DATA_DIR/<name>/imaging.nii.gz`` + segmentation."""

    name: str
    image: Path
    labels: Path


def find_cases(data_dir: str | os.PathLike[str]) -> list[Case]:
    """List the labelled cases of a KiTS19-layout folder, sorted by name.

    Case folders with an image but no segmentation (the KiTS19 test cases 210-299) are skipped: they cannot
    be trained on. Raises :class:`DatasetError` when the folder is missing or holds no labelled case.
    """
    root = Path(data_dir)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; pass a folder in KiTS19 layout")
    if not root.is_dir():
        raise DatasetError(
            f"{root} is a file, not a dataset folder; expected DATA_DIR/case_00000/imaging.nii.gz "
            "and segmentation.nii.gz (KiTS19 layout)"
        )
    cases: list[Case] = []
    unlabelled = 0
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image = _first_existing(sub, IMAGE_NAMES)
        labels = _first_existing(sub, LABEL_NAMES)
        if image is None:
            continue
        if labels is None:
            unlabelled += 1
            continue
        cases.append(Case(sub.name, image, labels))
    if not cases:
        if unlabelled:
            raise DatasetError(
                f"{root}: {unlabelled} case folder(s) have imaging but no segmentation.nii.gz; "
                "training needs labelled cases"
            )
        raise DatasetError(
            f"{root}: no case folders with imaging.nii.gz and segmentation.nii.gz; expected the KiTS19 "
            "layout DATA_DIR/case_00000/imaging.nii.gz + segmentation.nii.gz"
        )
    return cases


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    return None


def fingerprint(cases: Sequence[Case]) -> str:
    """A hash of the case names and their files' sizes and modification times.

    Cheap (no file is read) and enough to notice a dataset that was added to, replaced or edited, which
    invalidates a slice cache built from it.
    """
    items: list[Any] = []
    for case in cases:
        entry: list[Any] = [case.name]
        for path in (case.image, case.labels):
            st = path.stat()
            entry += [path.name, st.st_size, st.st_mtime_ns]
        items.append(entry)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Case names on each side of a case-level train/validation split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    seed: int
    val_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train": list(self.train),
            "val": list(self.val),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        return cls(
            train=tuple(data["train"]),
            val=tuple(data["val"]),
            seed=int(data["seed"]),
            val_fraction=float(data["val_fraction"]),
        )


def make_split(names: Sequence[str], val_fraction: float = 0.1, seed: int = 0) -> Split:
    """Draw a seeded case-level split; at least one case on each side.

    The case order is sorted first, so the split depends only on the set of names and the seed, not on
    the order the file system lists them in.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    ordered = sorted(set(names))
    if len(ordered) < 2:
        raise DatasetError(
            f"a case-level split needs at least 2 labelled cases (one for validation), found {len(ordered)}"
        )
    n_val = min(len(ordered) - 1, max(1, int(round(len(ordered) * val_fraction))))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted(ordered[i] for i in perm[:n_val])
    train = sorted(ordered[i] for i in perm[n_val:])
    return Split(tuple(train), tuple(val), int(seed), float(val_fraction))


def read_split(path: str | os.PathLike[str]) -> Split:
    """Read a ``split.json`` written by :func:`write_split`."""
    path = Path(path)
    try:
        return Split.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path}: cannot read the saved split ({exc}); delete it to draw a new one"
        ) from exc


def write_split(split: Split, path: str | os.PathLike[str]) -> Path:
    """Write ``split.json`` atomically."""
    return write_json_atomic(path, split.to_dict())


def check_split(split: Split, names: Sequence[str], where: str | os.PathLike[str]) -> None:
    """Raise :class:`DatasetError` when a saved split names cases the dataset no longer has."""
    missing = sorted(set(split.train + split.val) - set(names))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(
            f"{where}: the saved split lists {len(missing)} case(s) not in the dataset ({shown}); "
            "resume with the same DATA_DIR or start a new run folder"
        )
    overlap = set(split.train) & set(split.val)
    if overlap:
        raise DatasetError(f"{where}: cases on both sides of the split: {sorted(overlap)}")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON to a temporary file in the destination folder (created if needed), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- slice sets


@dataclass
class SliceSet:
    """Windowed, resized 2D slices and masks for one stage, possibly a subset of larger arrays.

    Attributes
    ----------
    images:
        ``(N, H, W)``: ``uint8`` (0-255 stands for the windowed [0, 1]) or floating point in [0, 1].
        May be a read-only memory map; only the rows in ``rows`` are read.
    masks:
        ``(N, H, W)``, any integer or bool type; values > 0 are foreground.
    rows:
        Indices into ``images``/``masks`` that belong to this set (default: all).
    positive:
        One flag per entry of ``rows``: ``True`` for a positive sample (for the tumor stage: the slice
        shows tumor). Negatives are subsampled each epoch to ``neg_ratio`` times the positives
        (see :class:`kitsseg.training.config.TrainConfig`). Default: all positive.
    cases:
        Optional case name per entry of ``rows`` (for reports only).
    """

    images: np.ndarray
    masks: np.ndarray
    rows: np.ndarray | None = None
    positive: np.ndarray | None = None
    cases: Sequence[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 3:
            raise DatasetError(f"slice images must be (N, H, W), got shape {self.images.shape}")
        if self.masks.shape != self.images.shape:
            raise DatasetError(f"masks {self.masks.shape} and images {self.images.shape} differ in shape")
        if self.images.dtype != np.uint8 and not np.issubdtype(self.images.dtype, np.floating):
            raise DatasetError(
                f"slice images must be uint8 (0-255) or float in [0, 1], got {self.images.dtype}"
            )
        if self.rows is None:
            self.rows = np.arange(self.images.shape[0], dtype=np.int64)
        self.rows = np.asarray(self.rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= self.images.shape[0]):
            raise DatasetError("slice set rows point outside the image array")
        if self.positive is None:
            self.positive = np.ones(self.rows.shape, dtype=bool)
        self.positive = np.asarray(self.positive, dtype=bool)
        if self.positive.shape != self.rows.shape:
            raise DatasetError(f"positive flags {self.positive.shape} do not match rows {self.rows.shape}")

    def __len__(self) -> int:
        return int(self.rows.size)  # type: ignore[union-attr]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def n_positive(self) -> int:
        return int(self.positive.sum())  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return (
            f"SliceSet(n={len(self)}, positive={self.n_positive}, size={self.input_size}, "
            f"dtype={self.images.dtype})"
        )

    def epoch_rows(self, neg_ratio: float | None, rng: np.random.Generator) -> np.ndarray:
        """Rows used in one epoch: all positives plus ``neg_ratio`` times as many negatives, drawn anew.

        ``neg_ratio=None`` keeps every row. Drawing fresh negatives each epoch shows the network more
        variety than a fixed subset, at the same cost per epoch.
        """
        rows, pos = self.rows, self.positive
        assert rows is not None
        assert pos is not None
        if neg_ratio is None:
            return rows.copy()
        negatives = rows[~pos]
        k = min(negatives.size, int(round(neg_ratio * int(pos.sum()))))
        chosen = rng.choice(negatives, size=k, replace=False) if k > 0 else negatives[:0]
        return np.sort(np.concatenate([rows[pos], chosen]))
