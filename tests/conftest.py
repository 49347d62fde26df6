"""Shared fixtures: one tiny phantom CT with labels, written to ``tmp_path`` in each file layout.

The phantom is 24 slices of 64 x 64 voxels with spacing (2.5, 0.8, 0.7) mm: non-identity and different
along rows and columns, so a swapped axis shows up as a wrong spacing. It has two kidneys and one tumor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kitsseg.evaluation.phantom import make_phantom, write_phantom

PHANTOM_SHAPE = (24, 64, 64)
PHANTOM_SPACING = (2.5, 0.8, 0.7)
PHANTOM_SEED = 7
LAYOUTS = ("kits19", "ras", "lps")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class PhantomCase:
    """A phantom written to disk, with the frame arrays it must load back to."""

    layout: str
    ct_path: Path
    labels_path: Path
    ct: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


@pytest.fixture(scope="session")
def phantom_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(ct_hu, labels)`` of the shared phantom, in the frame (read-only: copy before changing)."""
    ct, labels = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, seed=PHANTOM_SEED, n_tumors=1)
    ct.setflags(write=False)
    labels.setflags(write=False)
    return ct, labels


def _write(folder: Path, layout: str, arrays: tuple[np.ndarray, np.ndarray]) -> PhantomCase:
    ct_path, labels_path = write_phantom(
        folder, layout, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, seed=PHANTOM_SEED, n_tumors=1
    )
    return PhantomCase(layout, ct_path, labels_path, arrays[0], arrays[1], PHANTOM_SPACING)


@pytest.fixture
def kits19_case(tmp_path: Path, phantom_arrays: tuple[np.ndarray, np.ndarray]) -> PhantomCase:
    """The phantom in KiTS19 layout: ``tmp_path/kits19/case_00000/{imaging,segmentation}.nii.gz``."""
    return _write(tmp_path / "kits19", "kits19", phantom_arrays)


@pytest.fixture
def ras_case(tmp_path: Path, phantom_arrays: tuple[np.ndarray, np.ndarray]) -> PhantomCase:
    """The same phantom as an ``(x, y, z)`` RAS converter file."""
    return _write(tmp_path / "ras", "ras", phantom_arrays)


@pytest.fixture(params=LAYOUTS)
def phantom_case(
    request: pytest.FixtureRequest, tmp_path: Path, phantom_arrays: tuple[np.ndarray, np.ndarray]
) -> PhantomCase:
    """The phantom in each layout in turn (KiTS19, RAS, LPS)."""
    return _write(tmp_path / request.param, request.param, phantom_arrays)
