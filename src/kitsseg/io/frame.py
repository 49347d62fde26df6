"""The one internal frame: volumes as slice stacks ``data[z, row, col]``, and the way from a file to it.

Every CT or label volume is turned into a slice stack ``data[z, row, col]`` in the radiological frame,
nibabel axis codes ``('I', 'P', 'L')``: exactly the stored layout of KiTS19 files. ``data[k]`` drawn with
row 0 on top is the radiological axial view (rows anterior to posterior, columns patient right to left).
The axial axis is always picked from the affine, never assumed from the array axis order: KiTS19 stores
slices first, DICOM converters store ``(x, y, z)`` in RAS or LPS, and peer tools' issue trackers are full
of flipped outputs from guessing.

This module holds the frame's types (:class:`Volume`, :class:`Geometry`), the checks of an affine and the
reordering copy both ways; reading files is :mod:`kitsseg.io.load` (NIfTI) and :mod:`kitsseg.io.dicom`,
writing them :mod:`kitsseg.io.save`. Everything outside ``kitsseg.io`` takes and returns arrays.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidImageError, KitssegWarning

#: nibabel axis codes of the internal frame (KiTS19's stored layout).
FRAME_AXCODES: tuple[str, str, str] = ("I", "P", "L")
#: File layouts :func:`~kitsseg.io.save.write_frame` can produce: KiTS19's and the two usual converter
#: layouts.
LAYOUT_AXCODES: dict[str, tuple[str, str, str]] = {
    "kits19": FRAME_AXCODES,
    "ras": ("R", "A", "S"),
    "lps": ("L", "P", "S"),
}
#: Axes turned by more than this (radians, about 0.06 degree) make an affine "oblique" (warned about).
_OBLIQUE_TOL = 1e-3
#: Block of voxels copied at a time when reordering between the file's layout and the frame
#: (see ``_blocked_copy``): 16x64x64 is 64k voxels, which fits in cache in both memory orders.
_COPY_BLOCK = (16, 64, 64)
#: Largest label value a uint8 label file can hold.
_MAX_LABEL = 255
#: A qform and an sform (both coded) further apart than this, relative to the voxel size (axes) or in mm
#: (origin), disagree (warned about): float32 rounding in converters stays far below.
_XFORM_RTOL = 1e-3
_XFORM_ATOL_MM = 0.1
#: Largest voxel spacing accepted, in mm, along any axis. CT slices are at most about 10 mm apart and
#: in-plane spacing is under 2 mm; 100 mm between voxels is a broken header (1e30 mm gave null volumes).
MAX_SPACING_MM = 100.0
#: Smallest voxel spacing accepted, in mm. Clinical CT voxels are 0.2 mm or more; below 0.01 mm a header is
#: broken or in other units (metres written where mm belong). Such a header made ``segment`` hang before the
#: bridging reach was capped, and would still resample a slice stack into an absurd grid.
MIN_SPACING_MM = 0.01


class VolumeWarning(KitssegWarning):
    """A volume was loaded but something about it looks wrong (oblique axes, values that are not HU)."""


_QUIET_LOCK = threading.Lock()
_QUIET_DEPTH = 0
_QUIET_SAVED: int = logging.NOTSET


@contextmanager
def quiet_nibabel() -> Iterator[None]:
    """Keep nibabel's header checks from printing their own lines while a file is opened.

    nibabel logs what it fixes in a header (``pixdim[1,2,3] should be positive; setting to abs of pixdim
    values``) through a handler of its own on stderr, beside kitsseg's one error or warning line; kitsseg
    checks what matters itself (spacing, affine, values) and says so in its own words. Problems nibabel
    treats as errors still raise. Nested and threaded use is counted, so the level is restored once.
    """
    global _QUIET_DEPTH, _QUIET_SAVED
    logger = logging.getLogger("nibabel.global")
    with _QUIET_LOCK:
        if _QUIET_DEPTH == 0:
            _QUIET_SAVED = logger.level
            logger.setLevel(logging.CRITICAL)
        _QUIET_DEPTH += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_DEPTH -= 1
            if _QUIET_DEPTH == 0:
                logger.setLevel(_QUIET_SAVED)



@dataclass(eq=False)
class Geometry:
    """What is needed to put a frame array back into the file's own layout and header.

    ``ornt`` is the nibabel orientation transform from the file's array axes to the frame; ``affine`` is
    the file's best affine (sform, else qform, else pixdim), ``header`` a copy of its header.
    """

    shape: tuple[int, ...]
    ornt: np.ndarray
    affine: np.ndarray
    header: Any
    axcodes: tuple[str, ...]
    oblique: bool = False
    volume_index: int | None = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Shape of the stored array's three spatial axes (labels are saved with this shape)."""
        return (int(self.shape[0]), int(self.shape[1]), int(self.shape[2]))

    def to_stored(self, frame: np.ndarray) -> np.ndarray:
        """A frame array in the file's own array layout (a view; e.g. labels for a DICOM-SEG)."""
        from nibabel.orientations import apply_orientation

        return np.asarray(apply_orientation(frame, _inverse_ornt(self.ornt)))

    @property
    def frame_affine(self) -> np.ndarray:
        """Affine of the frame array: the file's affine composed with the inverse reorientation."""
        from nibabel.orientations import inv_ornt_aff

        return self.affine @ inv_ornt_aff(self.ornt, self.spatial_shape)

    @classmethod
    def for_frame(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
        """Geometry of an array that lives in the frame already, written KiTS19-style (no file yet)."""
        import nibabel as nib

        affine = kits19_affine(spacing)
        header = nib.Nifti1Header()
        header.set_data_shape(tuple(int(s) for s in shape))
        header.set_qform(affine, code=0)
        header.set_sform(affine, code=2)
        ornt = nib.orientations.axcodes2ornt(FRAME_AXCODES)
        identity = nib.orientations.ornt_transform(ornt, ornt)
        return cls(tuple(int(s) for s in shape), identity, affine, header, FRAME_AXCODES)


@dataclass(eq=False, repr=False)
class Volume:
    """A CT or label volume in the internal frame, with what is needed to write results back.

    ``data`` is ``(z, row, col)`` with axis codes ``('I', 'P', 'L')``; ``spacing`` is in mm in the same
    order; ``geometry`` maps back to the file; ``path`` is where it came from (None if made in memory).
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    path: Path | None = None

    @property
    def frame_affine(self) -> np.ndarray:
        """Voxel-to-world affine of ``data`` (compare grids with :func:`same_grid`)."""
        return self.geometry.frame_affine

    @classmethod
    def from_frame(
        cls, data: np.ndarray, spacing: tuple[float, float, float], path: Path | None = None
    ) -> Volume:
        """Wrap an array that is already in the frame (phantoms, tests); saved KiTS19-style."""
        if data.ndim != 3:
            raise ValueError(f"a frame volume is 3D (z, row, col); got shape {data.shape}")
        geometry = Geometry.for_frame(data.shape, spacing)
        return cls(data, tuple(float(s) for s in spacing), geometry, path)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (
            f"Volume(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, spacing=({spacing}) mm, "
            f"stored={''.join(self.geometry.axcodes)} {tuple(self.geometry.shape)}"
            f"{', oblique' if self.geometry.oblique else ''}, "
            f"path={str(self.path) if self.path else None!r})"
        )


def ct_from_stored(stored: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> Volume:
    """A CT volume from HU in some file's own array layout and its RAS affine, as if read from a NIfTI.

    The way in for other formats (:mod:`kitsseg.io.dicom`): the array becomes the frame here, with the
    same orientation checks and warnings as a NIfTI, and :func:`~kitsseg.io.save.save_labels` writes labels
    back with this affine (qform and sform codes 1, scanner) in this array layout. ``stored`` keeps its dtype
    (int16 or float32); it is copied, never kept.
    """
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(stored, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    geometry = _geometry(img, path, None, raw=img.header)
    dtype = np.int16 if stored.dtype == np.int16 else np.float32
    data = _to_frame(stored, geometry, dtype)
    if dtype == np.float32:
        _check_finite(data, path)
    _check_hu(data, path)
    return Volume(data, _spacing(geometry), geometry, path)


def _unreadable(path: Path, what: str, exc: BaseException) -> InvalidImageError:
    detail = f"{type(exc).__name__}: {exc}".strip()
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return InvalidImageError(
        f"{path} is not a readable NIfTI file ({detail}); expected a .nii or .nii.gz {what} volume"
    )


def _geometry(img: Any, path: Path, volume_index: int | None, raw: Any = None) -> Geometry:
    """Validate the affine and spacing, and work out the transform from file axes to the frame.

    ``raw``: the header as stored, when the image was made in memory (else it is read from the file).
    """
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt2axcodes, ornt_transform

    header = img.header
    try:
        affine = np.array(img.affine, dtype=np.float64)
        # nibabel silently "fixes" zero or negative pixdim on load; check what the file says.
        raw = _raw_header(img) if raw is None else raw
        sform_code = int(raw["sform_code"])
        pixdim = np.array(raw["pixdim"][1:4], dtype=np.float64)
    except Exception as exc:
        raise _unreadable(path, "image", exc) from exc
    if sform_code == 0 and (not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0)):
        raise InvalidImageError(
            f"{path} has voxel spacing (pixdim) {tuple(float(p) for p in pixdim)} mm; spacing must be "
            "positive and finite: fix the header (pixdim) or the conversion that wrote it"
        )
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidImageError(
            f"{path} has an affine with non-finite values; the voxel spacing and orientation are unknown: "
            "fix the header (qform/sform)"
        )
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms <= 1e-9):
        raise InvalidImageError(
            f"{path} has zero voxel spacing {tuple(float(z) for z in zooms)} mm in its affine; "
            "fix the header (qform/sform/pixdim)"
        )
    if np.any(zooms < MIN_SPACING_MM):
        raise InvalidImageError(
            f"{path} has voxel spacing {tuple(float(f'{z:.4g}') for z in zooms)} mm in its affine; less than "
            f"{MIN_SPACING_MM:g} mm between voxels is not a CT grid (a header in metres?): fix the header "
            "(qform/sform/pixdim)"
        )
    if not np.all(zooms <= MAX_SPACING_MM):
        raise InvalidImageError(
            f"{path} has voxel spacing {tuple(float(f'{z:.4g}') for z in zooms)} mm in its affine; more than "
            f"{MAX_SPACING_MM:g} mm between voxels is not a CT grid: fix the header (qform/sform/pixdim)"
        )
    rot = affine[:3, :3] / zooms
    if abs(np.linalg.det(rot)) < 1e-6:
        raise InvalidImageError(
            f"{path} has an affine whose axes are not independent; no axial axis can be found: fix the header"
        )
    try:
        file_ornt = io_orientation(affine)
    except Exception as exc:
        raise InvalidImageError(f"{path}: cannot tell its orientation from the affine ({exc})") from exc
    if np.isnan(file_ornt).any():
        raise InvalidImageError(f"{path}: cannot tell its orientation from the affine; fix the header")
    axcodes = tuple(str(c) for c in ornt2axcodes(file_ornt))
    obliquity = float(np.max(np.abs(nib.affines.obliquity(affine))))
    oblique = obliquity > _OBLIQUE_TOL
    if oblique:
        warnings.warn(
            f"{path} has oblique axes (up to {np.degrees(obliquity):.2f} degrees off the scanner axes); "
            f"it is read along the nearest axes {''.join(axcodes)} without resampling, so positions can "
            "be off by a fraction of a voxel per slice; reslice it first for exact geometry",
            VolumeWarning,
            stacklevel=3,
        )
    _warn_if_xforms_disagree(header, path, zooms)
    ornt = ornt_transform(file_ornt, axcodes2ornt(FRAME_AXCODES))
    return Geometry(
        shape=tuple(int(s) for s in img.shape),
        ornt=ornt,
        affine=affine,
        header=header.copy(),
        axcodes=axcodes,
        oblique=oblique,
        volume_index=volume_index,
    )


def _warn_if_xforms_disagree(header: Any, path: Path, zooms: np.ndarray) -> None:
    """Warn when the file holds a qform and an sform (both coded) that place the voxels differently.

    kitsseg, like nibabel, uses the sform; ITK-based tools (SimpleITK, ITK-SNAP) may use the qform, so
    the same file means two spacings or positions, and the mask is computed on only one of them. Such a
    file used to be segmented without a word.
    """
    from nibabel.orientations import io_orientation, ornt2axcodes

    try:
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
    except Exception:  # a qform nibabel cannot even build: the sform (checked above) is what is used
        return
    if not qcode or not scode or qform is None or sform is None:
        return
    tol = _XFORM_RTOL * float(zooms.max())
    q_zooms = np.sqrt((qform[:3, :3] ** 2).sum(axis=0))
    s_zooms = np.sqrt((sform[:3, :3] ** 2).sum(axis=0))
    shift = float(np.abs(qform[:3, 3] - sform[:3, 3]).max())
    differences = []
    if np.abs(q_zooms - s_zooms).max() > tol:
        differences.append(
            f"voxel size {' x '.join(f'{float(v):.4g}' for v in q_zooms)} vs "
            f"{' x '.join(f'{float(v):.4g}' for v in s_zooms)} mm"
        )
    elif np.abs(qform[:3, :3] - sform[:3, :3]).max() > tol:
        q_axes, s_axes = ("".join(ornt2axcodes(io_orientation(a))) for a in (qform, sform))
        differences.append(f"axes {q_axes} vs {s_axes}")
    if shift > _XFORM_ATOL_MM:
        differences.append(f"origins {shift:.3g} mm apart")
    if not differences:
        return
    warnings.warn(
        f"{path} has a qform and an sform that disagree ({', '.join(differences)}, qform first); kitsseg "
        "uses the sform, as nibabel does, but other tools may use the qform: make them agree in the header, "
        "and check the mask in your viewer",
        VolumeWarning,
        stacklevel=4,
    )


def _raw_header(img: Any) -> Any:
    """The header exactly as stored, without nibabel's automatic fixes."""
    holder = img.file_map["header"] if "header" in img.file_map else img.file_map["image"]
    with holder.get_prepare_fileobj("rb") as fobj:
        return type(img.header).from_fileobj(fobj, check=False)


def _spacing(geometry: Geometry) -> tuple[float, float, float]:
    aff = geometry.frame_affine
    z, r, c = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    return (float(z), float(r), float(c))


def _to_frame(raw: np.ndarray, geometry: Geometry, dtype: type, threads: int | None = None) -> np.ndarray:
    """Reorient a stored 3D array to the frame as a fresh C-ordered array of ``dtype`` (never a file view).

    ``raw`` is best passed in its stored dtype (int16 for most CTs): the cast happens block by block
    during the reordering copy, so no full-size float temporary exists besides the result. ``threads``
    bounds the copying threads (see :func:`_copy_threads`).
    """
    from nibabel.orientations import apply_orientation

    view = apply_orientation(raw, geometry.ornt)
    return _blocked_copy(np.empty(view.shape, dtype=dtype), view, _copy_threads(threads))


def _blocked_copy(dst: np.ndarray, src: np.ndarray, workers: int | None = None) -> np.ndarray:
    """``dst[...] = src`` for 3D arrays whose memory orders differ, copied in cache-sized blocks.

    Stored NIfTI arrays are Fortran-ordered, so for KiTS19 files the slice axis is the fastest in memory
    and the frame's is the slowest: one big copy (``np.array(order='C')``, ``np.asfortranarray``) then
    touches a new cache line for almost every voxel (0.9 s for a 300x512x512 uint8 mask, 1.1 s for
    float32 on this project's 2-core machine). Blocks of ``_COPY_BLOCK`` shared out to one thread per
    core (numpy copies without holding the GIL) take 0.13 s and 0.2 s (``benchmarks/README.md``). The
    cast to ``dst.dtype`` happens in the same pass.
    """
    bz, br, bc = _COPY_BLOCK
    nz, nr, nc = src.shape
    starts = [(k, r, c) for k in range(0, nz, bz) for r in range(0, nr, br) for c in range(0, nc, bc)]

    def copy(part: list[tuple[int, int, int]]) -> None:
        for k, r, c in part:
            dst[k : k + bz, r : r + br, c : c + bc] = src[k : k + bz, r : r + br, c : c + bc]

    workers = min(workers or _copy_threads(), max(1, len(starts) // 64))
    if workers == 1:
        copy(starts)
        return dst
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="kitsseg-copy") as pool:
        for future in [pool.submit(copy, starts[i::workers]) for i in range(workers)]:
            future.result()
    return dst


def _copy_threads(limit: int | None = None) -> int:
    """Threads for big copies: the cores this process may use, at most 4 (copies are memory-bound) and at
    most ``limit`` (the caller's thread count, e.g. ``--threads``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores, limit if limit is not None else cores))


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InvalidImageError(
            f"{path} has {bad} of {data.size} voxels that are NaN or infinite; replace them "
            "(e.g. with -1000 HU, air) before segmenting"
        )


def _check_hu(data: np.ndarray, path: Path, lo_hi: tuple[float, float] | None = None) -> None:
    """Warn (not fail) when the values do not look like Hounsfield units.

    ``lo_hi``: the range when already known (from the smaller stored integers), saving two passes.

    No negative value and nothing above 1000 is a windowed or normalised image (0..1, 0..255 in uint8,
    0..1000), not HU: a body CT holds air (-1000 HU), and one stored without its intercept (-1024) still
    has soft tissue above 1000. Only 0..1 used to warn, so an 8-bit windowed export was segmented silently.
    """
    lo, hi = lo_hi if lo_hi is not None else (float(data.min()), float(data.max()))
    if hi < 50.0 or (lo >= 0.0 and hi <= 1000.0):
        warnings.warn(
            f"{path} holds values from {lo:.4g} to {hi:.4g}, which do not look like Hounsfield units "
            "(air about -1000, soft tissue 20-80, bone above 300); is it a normalised or windowed image? "
            "kitsseg expects raw CT HU",
            VolumeWarning,
            stacklevel=3,
        )
    elif lo >= 0.0 and hi > 1000.0:
        warnings.warn(
            f"{path} has no negative values (range {lo:.4g} to {hi:.4g}) although air is about -1000 HU; "
            "is the rescale intercept (often -1024) missing from the header?",
            VolumeWarning,
            stacklevel=3,
        )


def kits19_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine KiTS19 stores for a ``(z, row, col)`` array with this spacing (axis codes I, P, L)."""
    z, r, c = (float(s) for s in spacing)
    return np.array(
        [[0.0, 0.0, -c, 0.0], [0.0, -r, 0.0, 0.0], [-z, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (frame back to file axes)."""
    inv = np.zeros_like(ornt)
    for src, (dst, flip) in enumerate(ornt):
        inv[int(dst)] = (src, flip)
    return inv


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when both frame arrays cover the same physical voxel grid, whatever their stored axis order."""
    return a.data.shape == b.data.shape and bool(np.allclose(a.frame_affine, b.frame_affine, atol=atol))
