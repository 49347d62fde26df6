"""The tumor shape model: eigenvalue-ratio statistics of the tumors in a folder of labels.

The seed paper keeps a predicted tumor only if the ratio of the two largest eigenvalues of its voxel
coordinates lies between the 5th and 95th percentile of that ratio over the ground-truth tumors (1.07 to
2.8). Those bounds depend on the unit (voxel index or mm), on the connectivity and on how specks are
treated, so they are derived here from data rather than copied: 26-connected 3D components of label 2,
ignoring components under ``min_voxels``, ratio l1/l2 in voxel index units by default, which reproduces the
paper's 1.07-2.8 (1.07-2.79) on the KiTS19 training labels (checked against the real labels by
``tests/postprocess/test_shapestats.py::test_kits19_labels_reproduce_paper_bounds``). The unit is written into
every output.

Reading 200 gzip label files dominates the run time, so each case is cropped to its tumor's bounding box
right after loading, and cases can be spread over worker processes; the result does not depend on the
number of workers.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from ..arrays import bounding_box
from ..errors import DatasetError, InputNotFoundError, InvalidOptionError, KitssegError, OutputError
from ..io.atomic import write_json_output
from .components import Unit, eigenvalue_ratio

#: Percentiles reported by :func:`shape_stats`; the 5th and 95th are the shape bounds.
PERCENTILES = (5, 25, 50, 75, 95)
TUMOR_LABEL = 2

__all__ = [
    "PERCENTILES",
    "CaseShapes",
    "ShapeStats",
    "case_shapes",
    "find_label_files",
    "shape_stats",
    "tumor_ratios",
    "write_json",
]


@dataclass(frozen=True)
class CaseShapes:
    """The tumor components of one case that count (at least ``min_voxels``), with their ratios."""

    case: str
    path: str
    spacing: tuple[float, ...]
    ratios: tuple[float, ...]
    voxels: tuple[int, ...]
    n_ignored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "path": self.path,
            "spacing": [round(s, 6) for s in self.spacing],
            "n_components": len(self.ratios),
            "n_ignored": self.n_ignored,
            "voxels": list(self.voxels),
            "ratios": [_finite_or_none(r) for r in self.ratios],
        }


@dataclass
class ShapeStats:
    """Ratios over a dataset and their percentiles, with the settings that produced them."""

    unit: Unit
    min_voxels: int
    largest_only: bool
    connectivity: int
    folder: str
    cases: list[CaseShapes] = field(default_factory=list)
    #: ``(path, one-line reason)`` of label files that could not be read (``skip_failed=True``); the
    #: statistics cover the other files.
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ratios(self) -> np.ndarray:
        values = [r for c in self.cases for r in c.ratios]
        return np.asarray(values, dtype=np.float64)

    @property
    def n_components(self) -> int:
        return sum(len(c.ratios) for c in self.cases)

    @property
    def percentiles(self) -> dict[int, float]:
        """Linear-interpolated percentiles; ``nan`` without components. Degenerate (infinite) ratios count
        as the most elongated shapes, so a percentile that reaches them is ``inf``."""
        values = np.sort(self.ratios)
        if values.size == 0:
            return {p: math.nan for p in PERCENTILES}
        out = {}
        with np.errstate(invalid="ignore"):  # interpolating between two infinite ratios gives nan
            for p in PERCENTILES:
                v = float(np.percentile(values, p))
                out[p] = math.inf if math.isnan(v) else v
        return out

    @property
    def bounds(self) -> tuple[float, float]:
        """The 5th-95th percentile range: the ``eig_bounds`` of the tumor shape filter, in :attr:`unit`."""
        p = self.percentiles
        return p[5], p[95]

    def to_dict(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "unit": self.unit,
            "definition": "l1/l2, largest over second-largest eigenvalue of the covariance of the "
            + ("voxel index coordinates" if self.unit == "voxel" else "voxel coordinates in mm")
            + f" of each 3D tumor component (label {TUMOR_LABEL})",
            "connectivity": self.connectivity,
            "min_voxels": self.min_voxels,
            "largest_only": self.largest_only,
            "folder": self.folder,
            "n_cases": len(self.cases),
            "n_components": self.n_components,
            "n_degenerate": int(np.count_nonzero(~np.isfinite(ratios))),
            "percentiles": {str(p): _finite_or_none(v) for p, v in self.percentiles.items()},
            "p5_p95": [_finite_or_none(v) for v in self.bounds],
            "per_case": [c.to_dict() for c in self.cases],
            "n_failed": len(self.failed),
            "failed": [{"path": p, "error": e} for p, e in self.failed],
        }

    def __repr__(self) -> str:
        lo, hi = self.bounds
        return (
            f"ShapeStats(unit={self.unit!r}, n_cases={len(self.cases)}, n_components={self.n_components}, "
            f"p5_p95=({lo:.3f}, {hi:.3f}))"
        )


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def find_label_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Label files of a dataset: KiTS19 ``case_XXXXX/segmentation.nii.gz`` or flat ``*.nii(.gz)``.

    In the KiTS19 layout only ``segmentation`` files count (``imaging.nii.gz`` sits beside them).
    """
    root = Path(folder)
    if not root.exists():
        raise InputNotFoundError(f"dataset folder {root} does not exist; give a folder of label NIfTI files")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; give a folder of label NIfTI files (or a KiTS19 folder)")
    nested = sorted(
        p
        for pattern in ("*/segmentation.nii.gz", "*/segmentation.nii")
        for p in root.glob(pattern)
        if p.is_file()
    )
    if nested:
        return nested
    from ..io.inputs import find_nifti

    flat = find_nifti(root)
    if not flat:
        raise DatasetError(
            f"{root} holds no label files: expected KiTS19 case folders with segmentation.nii.gz "
            "or NIfTI files (.nii, .nii.gz) directly in the folder"
        )
    return flat


def tumor_ratios(
    labels: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    unit: Unit = "voxel",
    min_voxels: int = 10,
    largest_only: bool = False,
    connectivity: int = 3,
) -> tuple[list[float], list[int], int]:
    """Eigenvalue ratios of the 3D tumor components of one label volume (frame layout).

    Returns ``(ratios, voxels, n_ignored)``, components in labelling order (largest first with
    ``largest_only``, which keeps just one); components under ``min_voxels`` are ignored and counted.
    """
    tumor = np.asarray(labels) == TUMOR_LABEL
    box = bounding_box(tumor)
    if box is None:
        return [], [], 0
    comp_labels, _ = ndimage.label(tumor[box], structure=ndimage.generate_binary_structure(3, connectivity))
    sizes = np.bincount(comp_labels.ravel())[1:]
    counted = [i for i, s in enumerate(sizes, start=1) if s >= min_voxels]
    n_ignored = len(sizes) - len(counted)
    if largest_only and counted:
        counted = [max(counted, key=lambda i: (sizes[i - 1], -i))]
    objects = ndimage.find_objects(comp_labels)
    ratios = []
    for i in counted:
        sub = objects[i - 1]
        coords = np.argwhere(comp_labels[sub] == i)
        ratios.append(eigenvalue_ratio(coords, unit=unit, spacing=spacing))
    return ratios, [int(sizes[i - 1]) for i in counted], n_ignored


def _load_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...], str]:
    """Labels in the frame, spacing, case name: all image reading goes through :mod:`kitsseg.io`."""
    from ..io.inputs import case_name
    from ..io.load import load_labels

    vol = load_labels(path)
    return vol.data, tuple(float(s) for s in vol.spacing), case_name(path)


def case_shapes(
    path: str | os.PathLike[str],
    *,
    unit: Unit = "voxel",
    min_voxels: int = 10,
    largest_only: bool = False,
    connectivity: int = 3,
) -> CaseShapes:
    """Load one label file, crop it to its tumor and measure its components (runs in worker processes)."""
    p = Path(path)
    data, spacing, case = _load_labels(p)
    box = bounding_box(data == TUMOR_LABEL)
    crop = data[box] if box is not None else data[:0, :0, :0]
    del data  # the full volume can be hundreds of MB; keep only the tumor's box
    ratios, voxels, n_ignored = tumor_ratios(
        crop,
        spacing,
        unit=unit,
        min_voxels=min_voxels,
        largest_only=largest_only,
        connectivity=connectivity,
    )
    return CaseShapes(case, str(p), spacing, tuple(ratios), tuple(voxels), n_ignored)


def shape_stats(
    folder: str | os.PathLike[str],
    *,
    unit: Unit = "voxel",
    min_voxels: int = 10,
    largest_only: bool = False,
    connectivity: int = 3,
    workers: int = 1,
    progress: Callable[[CaseShapes], None] | None = None,
    skip_failed: bool = False,
    on_failure: Callable[[str, str], None] | None = None,
) -> ShapeStats:
    """Eigenvalue-ratio statistics of every tumor component in a folder of labels.

    ``workers > 1`` reads cases in a process pool; cases are sorted by file path afterwards, so the
    statistics are the same for any number of workers. ``progress`` is called once per finished case.

    A label file that cannot be read (a :class:`~kitsseg.errors.KitssegError`: corrupt, not labels, a
    broken header) raises by default. With ``skip_failed`` it is recorded in :attr:`ShapeStats.failed`
    (and passed to ``on_failure(path, reason)``) and the others are still read, as ``kitsseg stats`` does:
    one bad file in a dataset of hundreds should not cost the statistics of the rest, and the caller
    decides whether statistics without it are good enough.
    """
    if unit not in ("voxel", "mm"):
        raise InvalidOptionError(f"unit must be 'voxel' or 'mm', got {unit!r}")
    if min_voxels < 1:
        raise InvalidOptionError(f"min_voxels must be >= 1, got {min_voxels}")
    files = find_label_files(folder)
    read = functools.partial(
        case_shapes, unit=unit, min_voxels=min_voxels, largest_only=largest_only, connectivity=connectivity
    )
    cases: list[CaseShapes] = []
    failed: list[tuple[str, str]] = []

    def collect(path: Path, get: Callable[[], CaseShapes]) -> None:
        try:
            cases.append(get())
        except KitssegError as exc:
            if not skip_failed:
                raise
            failed.append((str(path), " ".join(str(exc).split())))
            if on_failure is not None:
                on_failure(*failed[-1])
            return
        if progress is not None:
            progress(cases[-1])

    n_workers = max(1, min(int(workers), len(files)))
    if n_workers == 1:
        for f in files:
            collect(f, functools.partial(read, f))
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            futures = {pool.submit(read, f): f for f in files}
            for fut in as_completed(futures):
                collect(futures[fut], fut.result)
    cases.sort(key=lambda c: c.path)
    failed.sort()
    return ShapeStats(
        unit=unit,
        min_voxels=min_voxels,
        largest_only=largest_only,
        connectivity=connectivity,
        folder=str(folder),
        cases=cases,
        failed=failed,
    )


def write_json(stats: ShapeStats, path: str | os.PathLike[str]) -> Path:
    """Write :meth:`ShapeStats.to_dict` as JSON, atomically (temporary file beside it, then rename)."""
    out = Path(path)
    if not out.parent.is_dir():
        raise OutputError(
            f"cannot write {out}: folder {out.parent} does not exist; create it or choose another"
        )
    return write_json_output(out, stats.to_dict(), str(out))
