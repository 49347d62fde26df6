"""Synthetic abdominal CT with known kidneys and tumors, for tests and demos.

A phantom is built directly in the internal frame ``(z, row, col)``: rows run anterior to posterior,
columns run from the patient's right to left, slice index runs superior to inferior (axis codes
``('I', 'P', 'L')``). It holds what the pipeline relies on: air around an elliptic body with a fat layer,
soft tissue, a spine in the posterior midline, two kidneys in the posterior half left and right of the
spine (the right one a little lower, as in most people), and tumors (label 2) inside or bulging from a
kidney, with mild noise. Shapes are given as fractions of the field of view, so a phantom looks the same
at any size; tumors are spheres in millimetres. Deterministic for a seed.

Files are written through :func:`kitsseg.io.save.write_frame` (the one image I/O module), in the KiTS19
layout or an ``(x, y, z)`` RAS/LPS converter layout that describe the same physical voxels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io.frame import LAYOUT_AXCODES, kits19_affine
from ..io.save import write_frame

__all__ = ["HU", "kits19_affine", "make_phantom", "write_phantom"]

#: Nominal Hounsfield units of the phantom's tissues (kidney and tumor values vary per seed: a
#: ``(low, high)`` range, the others one value).
HU: dict[str, Any] = {
    "air": -1000.0,
    "fat": -100.0,
    "soft": 40.0,
    "bone": 450.0,
    "kidney": (150.0, 200.0),
    "tumor": (60.0, 90.0),
}

# Geometry in fractions of the half field of view (row: 0 at the centre, +1 posterior edge; col: +1
# patient's left edge; z: +1 inferior edge).
_BODY = (0.72, 0.90)  # semi-axes (row, col) of the body ellipse
_FAT = 0.86  # inner edge of the subcutaneous fat layer, as a fraction of the body semi-axes
_SPINE = (0.45, 0.0, 0.13)  # centre row, centre col, radius (in row units)
_KIDNEY_SEMI = (0.45, 0.2, 0.16)  # semi-axes (z, row, col)
_KIDNEY_CENTRE = {"right": (0.08, 0.22, -0.4), "left": (-0.05, 0.22, 0.4)}  # (z, row, col)


def make_phantom(
    shape: tuple[int, int, int] = (24, 64, 64),
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    seed: int = 0,
    n_tumors: int = 1,
    *,
    n_kidneys: int = 2,
    noise_hu: float = 10.0,
    tumor_radius: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Make a synthetic CT in HU and its labels (0 background, 1 kidney, 2 tumor), both in the frame.

    Parameters
    ----------
    shape, spacing
        ``(z, row, col)`` voxels and millimetres.
    seed
        Same seed, same phantom (noise, tissue values and tumor positions).
    n_tumors
        Tumors, each attached to a randomly chosen kidney (0 gives a tumor-free case).
    n_kidneys
        2 (both), 1 (the right kidney only, as after a nephrectomy) or 0 (no kidney slices at all).
    noise_hu
        Standard deviation of the Gaussian noise added to the CT.
    tumor_radius
        Tumor radius as a fraction of the kidney's mean semi-axis in mm (varied +-20% per tumor).

    Returns
    -------
    ``(ct, labels)``: float32 HU and uint8 arrays of ``shape``.
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (z, row, col); got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive sizes in mm (z, row, col); got {spacing}")
    if n_kidneys not in (0, 1, 2):
        raise ValueError(f"n_kidneys must be 0, 1 or 2; got {n_kidneys}")
    if n_tumors < 0 or (n_tumors and not n_kidneys):
        raise ValueError(f"n_tumors must be >= 0 and needs a kidney to sit in; got {n_tumors}")
    rng = np.random.default_rng(seed)

    # Normalised coordinates in [-1, 1] across the field of view (voxel centres).
    z, r, c = (
        ((np.arange(n) + 0.5) / n * 2.0 - 1.0).reshape([-1 if i == k else 1 for i in range(3)])
        for k, n in enumerate(shape)
    )
    half_mm = np.array(shape, dtype=float) * np.array(spacing) / 2.0  # half field of view in mm

    ct = np.full(shape, HU["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = (r / _BODY[0]) ** 2 + (c / _BODY[1]) ** 2 <= 1.0
    inner = (r / (_BODY[0] * _FAT)) ** 2 + (c / (_BODY[1] * _FAT)) ** 2 <= 1.0
    body3, inner3 = np.broadcast_to(body, shape), np.broadcast_to(inner, shape)
    ct[body3] = HU["fat"]
    ct[inner3] = HU["soft"]
    # Spine: a circle in mm (row units), bright cortex around a slightly darker body.
    sr, sc, srad = _SPINE
    rad_mm = srad * half_mm[1]
    d_spine = np.hypot((r - sr) * half_mm[1], (c - sc) * half_mm[2])
    ct[np.broadcast_to(d_spine <= rad_mm, shape)] = HU["bone"] + 250.0
    ct[np.broadcast_to(d_spine <= 0.7 * rad_mm, shape)] = HU["bone"]

    sides = ["right", "left"][:n_kidneys]
    for side in sides:
        cz, cr, cc = _KIDNEY_CENTRE[side]
        kz, kr, kc = _KIDNEY_SEMI
        kidney = ((z - cz) / kz) ** 2 + ((r - cr) / kr) ** 2 + ((c - cc) / kc) ** 2 <= 1.0
        ct[kidney] = rng.uniform(*HU["kidney"])
        labels[kidney] = 1

    for _ in range(n_tumors):
        side = sides[int(rng.integers(len(sides)))]
        centre = np.array(_KIDNEY_CENTRE[side])
        semi = np.array(_KIDNEY_SEMI)
        # A point 60-90% of the way to the kidney surface, away from the spine (lateral or anterior).
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2]) * np.sign(centre[2])
        direction[1] = -abs(direction[1]) * 0.5
        direction /= np.linalg.norm(direction)
        t_centre = centre + direction * semi * rng.uniform(0.6, 0.9)
        semi_mm = semi * half_mm
        radius_mm = tumor_radius * float(semi_mm.mean()) * rng.uniform(0.8, 1.2)
        d = np.sqrt(
            ((z - t_centre[0]) * half_mm[0]) ** 2
            + ((r - t_centre[1]) * half_mm[1]) ** 2
            + ((c - t_centre[2]) * half_mm[2]) ** 2
        )
        tumor = (d <= radius_mm) & np.broadcast_to(inner, shape)
        ct[tumor] = rng.uniform(*HU["tumor"])
        labels[tumor] = 2

    if noise_hu > 0:
        noise = rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
        ct[body3] += noise[body3]
    return ct, labels


def write_phantom(
    folder: str | os.PathLike[str],
    layout: str = "kits19",
    *,
    name: str = "case_00000",
    shape: tuple[int, int, int] = (24, 64, 64),
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    seed: int = 0,
    n_tumors: int = 1,
    **kwargs: object,
) -> tuple[Path, Path]:
    """Write a phantom as ``folder/<name>/imaging.nii.gz`` and ``segmentation.nii.gz`` (KiTS19 folders).

    ``layout`` is ``'kits19'`` (the frame array stored as is, KiTS19 affine), ``'ras'`` or ``'lps'``
    (``(x, y, z)`` arrays transposed and flipped, with the affine of the same physical voxels). The CT
    is stored as float32 HU, the labels as uint8. Extra keyword arguments go to :func:`make_phantom`.
    Returns ``(ct_path, labels_path)``.
    """
    if layout not in LAYOUT_AXCODES:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_AXCODES)}, got {layout!r}")
    ct, labels = make_phantom(shape, spacing, seed, n_tumors, **kwargs)  # type: ignore[arg-type]
    case = Path(folder) / name
    ct_path = write_frame(ct, case / "imaging.nii.gz", spacing=spacing, layout=layout)
    labels_path = write_frame(labels, case / "segmentation.nii.gz", spacing=spacing, layout=layout)
    return ct_path, labels_path
