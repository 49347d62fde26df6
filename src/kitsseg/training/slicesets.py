"""Real CT slice sets (``.npz``) brought onto the model grid, with labels, patient groups and sources.

A slice set is an ``.npz`` with ``image_u8`` ``(N, H, W)``, ``label`` ``(N, H, W)`` and, for spacing-aware
training, ``spacing_rc_mm`` ``(N, 2)``. How its grey values map to HU is a property of the source, declared
in the training config (``grey_to_hu``: ``[scale, offset]``, HU = grey * scale + offset), because public
slice sets are exported with different display windows: KiTS19 and CURVAS slices are ``clip(HU, 0, 255)``
(scale 1, offset 0); the KiTS23 renders were drawn with a display window of about [-110, 330] HU (fat mode at
grey 5, soft tissue near grey 84), so HU = grey * 440 / 255 - 110.

Every slice goes through :meth:`kitsseg.inference.preprocess.SliceGrid.to_model`, the function inference uses,
at its own pixel spacing; a set without spacing takes ``default_spacing_mm`` from its config entry (say so in
the model card). Labels are resampled as float masks and thresholded at 0.5.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError
from ..inference.preprocess import SliceGrid, window


@dataclass(frozen=True)
class SliceSource:
    """One entry of the config's ``sources`` list.

    ``label_map`` maps stored label values to KiTS labels (1 kidney, 2 tumor); unlisted values become 0.
    ``fields`` names the arrays when one file holds several annotators (``a1_image_u8``...): a list of
    ``[image_field, label_field, group_field]``; ``group_prefix`` + the group field's value (split at ``_``,
    first part) names the patient. ``group_field`` ``case_id`` is the default.
    """

    name: str
    path: str
    grey_to_hu: tuple[float, float] = (1.0, 0.0)
    label_map: Mapping[int, int] | None = None
    group_prefix: str = "kits_"
    fields: tuple[tuple[str, str, str], ...] = (("image_u8", "label", "case_id"),)
    default_spacing_mm: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceSource:
        lm = d.get("label_map")
        return cls(
            name=str(d["name"]),
            path=str(d["path"]),
            grey_to_hu=tuple(float(v) for v in d.get("grey_to_hu", (1.0, 0.0))),  # type: ignore[arg-type]
            label_map=None if lm is None else {int(k): int(v) for k, v in lm.items()},
            group_prefix=str(d.get("group_prefix", "kits_")),
            fields=tuple(tuple(f) for f in d.get("fields", (("image_u8", "label", "case_id"),))),  # type: ignore[misc]
            default_spacing_mm=None
            if d.get("default_spacing_mm") is None
            else float(d["default_spacing_mm"]),
        )


@dataclass
class GridSlices:
    """Slices on the model grid. ``image`` ``(N, 1, H, W)`` float16 in window units [0, 1]; ``kidney``
    (label > 0) and ``tumor`` (label 2) ``(N, 1, H, W)`` uint8; ``group``, ``source`` ``(N,)`` str;
    ``spacing`` ``(N, 2)`` the slices' own pixel spacing (mm)."""

    image: torch.Tensor
    kidney: torch.Tensor
    tumor: torch.Tensor
    group: np.ndarray
    source: np.ndarray
    spacing: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])


def slices_to_grid(
    hu: np.ndarray,
    label: np.ndarray,
    spacing_rc: np.ndarray,
    hu_window: tuple[float, float],
    grid: tuple[int, int],
    model_spacing: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window and resample slices ``(N, H, W)`` (HU, KiTS labels) onto the model grid, one by one with
    their own spacing: exactly what inference feeds the kidney network (:class:`SliceGrid`)."""
    images, kts, tus = [], [], []
    for i in range(hu.shape[0]):
        g = SliceGrid.for_slice(hu.shape[1:], tuple(spacing_rc[i]), grid, model_spacing)
        x = window(torch.from_numpy(np.ascontiguousarray(hu[i], dtype=np.float32)), *hu_window)[None, None]
        lab = torch.from_numpy(np.ascontiguousarray(label[i]))[None, None]
        images.append(g.to_model(x).half())
        kts.append((g.to_model((lab > 0).float()) >= 0.5).to(torch.uint8))
        tus.append((g.to_model((lab == 2).float()) >= 0.5).to(torch.uint8))
    return torch.cat(images), torch.cat(kts), torch.cat(tus)


@dataclass
class RawSlices:
    """Slices of one source at their own resolution: ``hu`` ``(N, H, W)`` float32, ``label`` KiTS labels
    ``(N, H, W)`` uint8, ``spacing`` ``(N, 2)`` mm, ``group`` and ``source`` ``(N,)`` str."""

    hu: np.ndarray
    label: np.ndarray
    spacing: np.ndarray
    group: np.ndarray
    source: np.ndarray


def read_source(root: str | os.PathLike[str], source: SliceSource) -> list[RawSlices]:
    """Read one slice set (one part per ``fields`` entry) in HU with KiTS labels, at native resolution."""
    path = Path(root) / source.path
    if not path.is_file():
        raise DatasetError(f"slice set {source.name!r} not found: {path}")
    parts: list[RawSlices] = []
    # A file that is not an .npz archive (a text file, a bare .npy, a truncated download) or lacks the
    # arrays the config names is one DatasetError line: np.load's ValueError or KeyError was a traceback.
    try:
        d = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"slice set {source.name!r}: {path} is not a readable .npz archive ({exc}); "
            "give the slice set's .npz file"
        ) from None
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise DatasetError(f"slice set {source.name!r}: {path} is a single array, not an .npz archive")
    missing = sorted({f for fs in source.fields for f in fs} - set(d.files))
    if missing:
        d.close()
        raise DatasetError(
            f"slice set {source.name!r}: {path} has no array(s) {missing} (it holds {sorted(d.files)}); "
            "check the source's fields"
        )
    with d:
        for image_f, label_f, group_f in source.fields:
            grey = d[image_f].astype(np.float32)
            hu = grey * source.grey_to_hu[0] + source.grey_to_hu[1]
            raw = d[label_f]
            if source.label_map is not None:
                lab = np.zeros(raw.shape, dtype=np.uint8)
                for k, v in source.label_map.items():
                    lab[raw == k] = v
            else:
                lab = raw.astype(np.uint8)
            if "spacing_rc_mm" in d.files:
                spacing = d["spacing_rc_mm"].astype(np.float64)
            elif source.default_spacing_mm is not None:
                spacing = np.full((grey.shape[0], 2), source.default_spacing_mm)
            else:
                raise DatasetError(
                    f"slice set {source.name!r} has no spacing_rc_mm; give default_spacing_mm in the config"
                )
            groups = np.array([source.group_prefix + str(v).split("_")[0] for v in d[group_f]])
            parts.append(RawSlices(hu, lab, spacing, groups, np.array([source.name] * len(groups))))
    return parts


def load_source(
    root: str | os.PathLike[str],
    source: SliceSource,
    hu_window: tuple[float, float],
    grid: tuple[int, int],
    model_spacing: float | None,
) -> GridSlices:
    """Read one slice set from ``root / source.path`` and bring it onto the model grid."""
    parts: list[GridSlices] = []
    for raw in read_source(root, source):
        img, kt, tu = slices_to_grid(raw.hu, raw.label, raw.spacing, hu_window, grid, model_spacing)
        parts.append(GridSlices(img, kt, tu, raw.group, raw.source, raw.spacing))
    return concat(parts)


def concat(parts: Sequence[GridSlices]) -> GridSlices:
    return GridSlices(
        torch.cat([p.image for p in parts]),
        torch.cat([p.kidney for p in parts]),
        torch.cat([p.tumor for p in parts]),
        np.concatenate([p.group for p in parts]),
        np.concatenate([p.source for p in parts]),
        np.concatenate([p.spacing for p in parts]),
    )


def split_groups(groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation slices: whole patient groups, drawn with a fixed seed per family
    (the part of the group name before ``_``), so a small family is not over- or under-drawn by chance."""
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    listed = groups.tolist()
    for family in sorted({g.split("_")[0] for g in listed}):
        uniq = np.array(sorted({g for g in listed if g.startswith(family + "_")}))
        n_val = max(1, int(round(len(uniq) * val_fraction)))
        val_groups |= set(rng.choice(uniq, size=n_val, replace=False).tolist())
    return np.array([g in val_groups for g in listed])
