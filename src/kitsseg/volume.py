"""All image file I/O: NIfTI volumes in, one internal frame inside, the input's own layout out.

Every CT or label volume is turned into a slice stack ``data[z, row, col]`` in the radiological frame,
nibabel axis codes ``('I', 'P', 'L')``: exactly the stored layout of KiTS19 files. ``data[k]`` drawn with
row 0 on top is the radiological axial view (rows anterior to posterior, columns patient right to left).
The axial axis is always picked from the affine, never assumed from the array axis order: KiTS19 stores
slices first, DICOM converters store ``(x, y, z)`` in RAS or LPS, and peer tools' issue trackers are full
of flipped outputs from guessing. On the way out :func:`save_labels` undoes the reorientation and
writes uint8 labels with the input's affine, qform and sform (and codes), atomically.

This is the only module that reads or writes image files; everything else takes and returns arrays.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .atomic import atomic_output
from .errors import (
    InputNotFoundError,
    InvalidImageError,
    KitssegError,
    KitssegWarning,
    OutputError,
    ResourceError,
)
from .labeltable import NIFTI_DESCRIP
from .names import NIFTI_SUFFIXES as NIFTI_SUFFIXES  # re-exported: where most callers look for it

if TYPE_CHECKING:
    import nibabel as nib
    from nibabel.arrayproxy import ArrayProxy

#: nibabel axis codes of the internal frame (KiTS19's stored layout).
FRAME_AXCODES: tuple[str, str, str] = ("I", "P", "L")
#: File layouts :func:`write_frame` can produce: KiTS19's and the two usual converter layouts.
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
#: Largest voxel spacing accepted, in mm, along any axis. CT slices are at most about 10 mm apart and
#: in-plane spacing is under 2 mm; 100 mm between voxels is a broken header (1e30 mm gave null volumes).
MAX_SPACING_MM = 100.0
#: Largest finite float32, the dtype scaled CT values are computed in.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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


# --------------------------------------------------------------------------------------------- types


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


# --------------------------------------------------------------------------------------------- loading


def load_ct(
    path: str | os.PathLike[str],
    *,
    volume_index: int | None = None,
    keep_int16: bool = False,
    threads: int | None = None,
) -> Volume:
    """Load a CT volume as float32 HU in the frame (or int16 HU, see ``keep_int16``).

    ``scl_slope``/``scl_inter`` are applied. A 4D file with more than one volume needs ``volume_index``;
    a singleton fourth axis is dropped. Raises :class:`InputNotFoundError`, :class:`InvalidImageError`
    (not NIfTI, truncated, 2D, several volumes, empty axis, NaN/inf voxels, bad spacing) or
    :class:`ResourceError` (clearly too large for the memory available). Warns (:class:`VolumeWarning`)
    for oblique axes and for values that do not look like HU.

    ``keep_int16``: when the file stores small integers (int16, int8, uint8; most CTs) with slope 1 and an
    integral intercept, ``data`` is int16 HU: exactly the same values in half the memory, and half the
    bytes to write while reordering (``segment`` uses it: the 512x512x300 benchmark loads in 0.37-0.40 s
    instead of 0.42-0.78 s). Every other file still gives float32.

    ``threads``: at most this many threads reorder the voxels (default: the cores this process may use,
    at most 4; see ``_blocked_copy``).

    A folder that holds DICOM files is read as one CT series (:func:`kitsseg.dicom_io.load_dicom_ct`,
    the ``dicom`` extra), into the same frame.
    """
    path = Path(path)
    if path.is_dir():
        from .dicom_io import holds_dicom_series, load_dicom_ct

        if holds_dicom_series(path):
            if volume_index not in (None, 0):
                raise InvalidImageError(
                    f"volume_index={volume_index} asked for, but {path} is a DICOM series (one volume)"
                )
            return load_dicom_ct(path, keep_int16=keep_int16)
    img = _open_nifti(path, "CT")
    dtype = img.get_data_dtype()
    index = _volume_index(img, path, volume_index, allow_index=True)
    shape3 = tuple(int(s) for s in img.shape[:3])
    n = int(np.prod(shape3))
    # The float32 result and the stored values (read whole from .nii.gz, in their own dtype).
    _check_memory(path, n * (4 + dtype.itemsize), "as float32 HU")
    geometry = _geometry(img, path, index)
    from .niftistream import can_stream, read_into_frame

    slope, inter = _scaling(img) if index is None else (1.0, 0.0)
    integer = index is None and dtype.kind in "iub"
    small = integer and dtype.itemsize <= 2 and dtype != np.uint16
    as_int16 = keep_int16 and small and slope == 1.0 and inter == round(inter) and abs(inter) <= 2**15
    frame_dtype = np.int16 if as_int16 else np.float32
    with _read_errors(path):
        if index is None and can_stream(img, path):
            # Decompression and reordering overlap, piece by piece (kitsseg.niftistream). Each piece is
            # reordered on all cores: on the 2-core benchmark machine the first load in a fresh process
            # took 0.45-0.48 s in 8 of 8 runs this way, 0.46-1.13 s with one copying thread.
            copy = functools.partial(_blocked_copy, workers=_copy_threads(threads))
            data, lo_hi = read_into_frame(img, path, geometry.ornt, frame_dtype, copy)
        else:
            if index is None:
                # Unscaled, in the stored dtype (int16 for most CTs): the cast to float32 happens inside
                # the reordering copy instead of as a separate full-size pass.
                proxy = cast("ArrayProxy", img.dataobj)  # opened from a file: an array proxy
                raw = np.asanyarray(proxy.get_unscaled()).reshape(shape3, order="A")
            else:
                raw = np.asarray(img.dataobj[..., index], dtype=np.float32).reshape(shape3, order="A")
            data = _to_frame(raw, geometry, frame_dtype, threads)
            lo_hi = (float(raw.min()), float(raw.max())) if integer and raw.size else None
            del raw
    if as_int16 and inter != 0.0:
        fits = lo_hi is not None and -(2**15) <= lo_hi[0] + inter and lo_hi[1] + inter <= 2**15 - 1
        if not fits:
            data = data.astype(np.float32)  # the shifted values would leave int16: rare, keep them exact
        data += data.dtype.type(inter)
        if lo_hi is not None:
            lo_hi = (lo_hi[0] + inter, lo_hi[1] + inter)
    elif (slope, inter) != (1.0, 0.0):
        if integer and lo_hi is not None:  # refuse before numpy overflows (and warns) while scaling
            low, high = sorted(v * slope + inter for v in lo_hi)
            _check_scaled_range((low, high), slope, inter, path)
        data *= np.float32(slope)
        data += np.float32(inter)
        if lo_hi is not None:
            lo_hi = tuple(sorted(v * slope + inter for v in lo_hi))  # type: ignore[assignment]
    if integer and lo_hi is not None and np.isfinite([slope, inter]).all():
        _check_scaled_range(lo_hi, slope, inter, path)
    else:
        _check_finite(data, path)
        lo_hi = None
    _check_hu(data, path, lo_hi)
    return Volume(data, _spacing(geometry), geometry, path)


def _check_scaled_range(lo_hi: tuple[float, float], slope: float, inter: float, path: Path) -> None:
    """Refuse stored integers that ``scl_slope``/``scl_inter`` scale beyond float32 (they become infinite).

    The NaN/inf check is skipped for integer storage (integers are always finite), so the scaled range,
    known from the stored minimum and maximum, is checked instead: ``scl_slope = 1e38`` on int16 would
    otherwise give infinite HU and an empty mask with exit 0.
    """
    lo, hi = lo_hi
    if max(abs(lo), abs(hi)) > _FLOAT32_MAX or not np.isfinite([lo, hi]).all():
        raise InvalidImageError(
            f"{path} stores integers that its header scales (scl_slope={slope:g}, scl_inter={inter:g}) to "
            f"values from {lo:.3g} to {hi:.3g}, beyond what float32 holds (they become infinite); fix "
            "scl_slope/scl_inter in the header (a CT usually has slope 1 and intercept -1024)"
        )


def ct_from_stored(stored: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> Volume:
    """A CT volume from HU in some file's own array layout and its RAS affine, as if read from a NIfTI.

    The way in for other formats (:mod:`kitsseg.dicom_io`): the array becomes the frame here, with the
    same orientation checks and warnings as a NIfTI, and :func:`save_labels` writes labels back with this
    affine (qform and sform codes 1, scanner) in this array layout. ``stored`` keeps its dtype (int16 or
    float32); it is copied, never kept.
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


def _scaling(img: Any) -> tuple[float, float]:
    """The (slope, intercept) nibabel applies to stored values: (1, 0) where the header has none."""
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def load_labels(path: str | os.PathLike[str]) -> Volume:
    """Load an integer label volume (0 background, 1 kidney, 2 tumor...) as uint8 in the frame.

    Stored uint16 (nine KiTS19 cases) or integer-valued floats are accepted; values that are negative,
    above 255 or not integers raise :class:`InvalidImageError`.
    """
    path = Path(path)
    img = _open_nifti(path, "label")
    dtype = img.get_data_dtype()
    _volume_index(img, path, None, allow_index=False)
    shape3 = tuple(int(s) for s in img.shape[:3])
    n = int(np.prod(shape3))
    _check_memory(path, n * (dtype.itemsize + 1), "as uint8 labels")
    geometry = _geometry(img, path, None)
    with _read_errors(path):
        raw = np.asanyarray(img.dataobj).reshape(shape3, order="A")
    _check_label_values(raw, path)
    data = _to_frame(raw, geometry, np.uint8)
    return Volume(data, _spacing(geometry), geometry, path)


def _open_nifti(path: Path, what: str) -> nib.Nifti1Pair:
    """Open the header of a NIfTI file and check everything that can be checked before reading voxels."""
    import nibabel as nib

    if not path.exists():
        raise InputNotFoundError(f"{what} file {path} does not exist; check the path")
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder; expected a .nii or .nii.gz {what} volume file")
    try:
        with quiet_nibabel():
            img = nib.load(str(path))
    except MemoryError as exc:
        raise ResourceError(f"not enough memory to open {path}: {exc}") from exc
    except Exception as exc:  # nibabel raises many types for broken files; all mean "unreadable"
        raise _unreadable(path, what, exc) from exc
    if not isinstance(img, nib.Nifti1Pair):  # Nifti1Image, Nifti2Image and the .hdr/.img pairs
        raise InvalidImageError(
            f"{path} is a {type(img).__name__}, not a NIfTI file; expected a .nii or .nii.gz {what} "
            "volume (convert DICOM or other formats first, e.g. with dcm2niix)"
        )
    try:
        shape = tuple(int(s) for s in img.shape)
        dtype = img.get_data_dtype()
    except Exception as exc:
        raise _unreadable(path, what, exc) from exc
    if len(shape) < 3:
        raise InvalidImageError(
            f"{path} is {len(shape)}D (shape {shape}); expected a 3D {what} volume (a stack of axial slices)"
        )
    if any(s < 0 for s in shape):
        raise InvalidImageError(f"{path} has a negative axis length (shape {shape}); its header is corrupt")
    if any(s == 0 for s in shape):
        raise InvalidImageError(f"{path} has an empty axis (shape {shape}); it holds no voxels")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InvalidImageError(
            f"{path} stores voxels as {dtype}; expected real numbers (integer or float) for a {what} volume"
        )
    _check_file_size(img, path, shape, dtype)
    return img


def _unreadable(path: Path, what: str, exc: BaseException) -> InvalidImageError:
    detail = f"{type(exc).__name__}: {exc}".strip()
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return InvalidImageError(
        f"{path} is not a readable NIfTI file ({detail}); expected a .nii or .nii.gz {what} volume"
    )


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn whatever a broken file raises while its voxels are read into the project's errors."""
    try:
        yield
    except KitssegError:
        raise
    except MemoryError as exc:
        raise ResourceError(f"not enough memory to read {path}: {exc}") from exc
    except Exception as exc:  # truncated gzip, short reads, bad scaling: nibabel raises many types
        raise InvalidImageError(
            f"{path} is not a readable NIfTI file ({type(exc).__name__}: {str(exc)[:200]}); the voxel "
            "data may be truncated or corrupt: download or convert it again"
        ) from exc


def _check_file_size(img: Any, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Catch truncated uncompressed files before reading (compressed ones fail while reading)."""
    if not path.name.lower().endswith(".nii"):
        return
    try:
        offset = int(img.dataobj.offset)
    except Exception:
        return
    needed = offset + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have < needed:
        raise InvalidImageError(
            f"{path} is truncated: its header promises {needed} bytes, the file holds {have}; "
            "copy or convert it again"
        )


def _volume_index(img: Any, path: Path, volume_index: int | None, *, allow_index: bool) -> int | None:
    """Which volume of a 4D file to read (None: the file is 3D, or its extra axes are all singletons)."""
    shape = tuple(int(s) for s in img.shape)
    extra = shape[3:]
    if all(s == 1 for s in extra):
        if volume_index not in (None, 0):
            raise InvalidImageError(
                f"volume_index={volume_index} asked for, but {path} holds a single volume (shape {shape})"
            )
        return None
    if len(extra) > 1:
        raise InvalidImageError(
            f"{path} is {len(shape)}D (shape {shape}); expected a 3D volume: split it into 3D files first"
        )
    if volume_index is None or not allow_index:
        hint = (
            "pick one with volume_index (--volume-index) or split the file"
            if allow_index
            else "split it into 3D files"
        )
        raise InvalidImageError(
            f"{path} is 4D with {extra[0]} volumes (shape {shape}); expected a single 3D volume: {hint}"
        )
    if not 0 <= volume_index < extra[0]:
        raise InvalidImageError(
            f"volume_index={volume_index} is out of range: {path} holds volumes 0..{extra[0] - 1}"
        )
    return int(volume_index)


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
    """
    lo, hi = lo_hi if lo_hi is not None else (float(data.min()), float(data.max()))
    if hi < 50.0 or (lo >= 0.0 and hi <= 1.0):
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


def _check_label_values(raw: np.ndarray, path: Path) -> None:
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise InvalidImageError(f"{path} holds NaN or infinite values; expected integer labels 0..255")
        if not np.array_equal(raw, np.round(raw)):
            raise InvalidImageError(
                f"{path} holds non-integer values; expected integer labels (0 background, 1 kidney, "
                "2 tumor): is it a probability map or a CT?"
            )
    if raw.size and raw.dtype.kind != "b":
        lo, hi = raw.min(), raw.max()
        if lo < 0 or hi > _MAX_LABEL:
            raise InvalidImageError(
                f"{path} holds values from {lo} to {hi}; expected integer labels 0..255 "
                "(0 background, 1 kidney, 2 tumor): is it a CT rather than a label file?"
            )


def _available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), or None where it cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _check_memory(path: Path, needed: int, how: str) -> None:
    available = _available_memory()
    if available is not None and needed > available:
        gib = 1024**3
        raise ResourceError(
            f"{path} needs about {needed / gib:.1f} GiB of memory to load {how}, but only "
            f"{available / gib:.1f} GiB is available; close other programs, use a machine with more "
            "memory, or crop the volume"
        )


# --------------------------------------------------------------------------------------------- saving


def save_labels(
    labels: np.ndarray, like: Volume, path: str | os.PathLike[str], *, threads: int | None = None
) -> Path:
    """Write frame labels back in ``like``'s own array layout and header, as uint8, atomically.

    The affine, qform and sform (with their codes) of the input are kept; ``scl_slope``/``scl_inter``
    are reset so labels are stored exactly. Raises ``ValueError`` for labels of the wrong shape or values,
    :class:`OutputError` when ``path`` is the input itself or cannot be written (nothing is left behind).
    ``threads`` bounds the threads that reorder the labels (as in :func:`load_ct`).
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.data.shape:
        raise ValueError(
            f"labels have shape {labels.shape} but the volume they belong to has {like.data.shape} "
            "(both in the (z, row, col) frame)"
        )
    stored = _as_uint8_labels(labels)
    _check_output_path(path, like.path)
    geometry = like.geometry
    out = np.asarray(apply_orientation(stored, _inverse_ornt(geometry.ornt)))
    if out.shape != geometry.spatial_shape:  # a bug in the geometry, not a user error
        raise RuntimeError(f"labels map back to {out.shape}, expected {geometry.spatial_shape}")
    # The header copy keeps the qform and sform exactly (quaternions, srows, codes); with affine=None
    # nibabel leaves them alone and only updates the shape (a 4D input gives 3D labels) and dtype.
    header = geometry.header.copy()
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    stored_f = _to_stored_order(stored, geometry.ornt, out.shape, threads)
    img = klass(stored_f, None, header=header)
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0  # the CT's display range would hide labels
    # Viewers and tools read what the file is (kitsseg.labeltable): a label image, and which label is which.
    img.header.set_intent("label")
    img.header["descrip"] = NIFTI_DESCRIP.encode("ascii")
    _atomic_save(img, path)
    return path


def _to_stored_order(
    frame: np.ndarray, ornt: np.ndarray, stored_shape: tuple[int, ...], threads: int | None = None
) -> np.ndarray:
    """Frame labels in the file's array layout, Fortran-ordered as nibabel writes them.

    Labels are a few percent of a CT: the result starts as zeros (calloc: pages are not touched) and only
    the labels' bounding box is reordered into it, in cache-sized blocks (:func:`_blocked_copy`), so the
    cost follows the box, not the volume (a 300x512x512 mask: 0.13 s for the whole volume).
    """
    from nibabel.orientations import apply_orientation

    from .postprocess import bounding_box

    out = np.zeros(stored_shape, dtype=np.uint8, order="F")
    box = bounding_box(frame)
    if box is None:
        return out
    inverse = _inverse_ornt(ornt)
    stored_box: list[slice] = [slice(0)] * 3
    for axis, (to_axis, flip) in enumerate(inverse):  # apply_orientation: flip each axis, then transpose
        sl, n = box[axis], frame.shape[axis]
        stored_box[int(to_axis)] = slice(n - sl.stop, n - sl.start) if flip == -1 else sl
    _blocked_copy(out[tuple(stored_box)], apply_orientation(frame[box], inverse), _copy_threads(threads))
    return out


def write_frame(
    data: np.ndarray,
    path: str | os.PathLike[str],
    *,
    spacing: tuple[float, float, float],
    layout: str = "kits19",
) -> Path:
    """Write a frame array as a NIfTI file in KiTS19 layout or an ``(x, y, z)`` RAS/LPS converter layout.

    All three describe the same physical voxels (the KiTS19 affine of ``spacing``); the converter layouts
    transpose and flip the array and carry the matching affine with qform and sform codes 1 (scanner),
    as dcm2niix writes them. Used for phantoms and test data; the dtype of ``data`` is kept.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    if layout not in LAYOUT_AXCODES:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_AXCODES)}, got {layout!r}")
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"a frame array is 3D (z, row, col); got shape {data.shape}")
    to_file = ornt_transform(axcodes2ornt(FRAME_AXCODES), axcodes2ornt(LAYOUT_AXCODES[layout]))
    arr = np.asarray(apply_orientation(data, to_file))
    affine = kits19_affine(spacing) @ inv_ornt_aff(to_file, data.shape)
    img = nib.Nifti1Image(arr, affine)
    if layout == "kits19":
        img.set_qform(affine, code=0)
        img.set_sform(affine, code=2)
    else:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    _atomic_save(img, Path(path))
    return Path(path)


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


def _as_uint8_labels(labels: np.ndarray) -> np.ndarray:
    if labels.dtype == np.uint8:
        return labels
    if labels.dtype.kind == "b":
        return labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers (0 background, 1 kidney, 2 tumor); got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > _MAX_LABEL):
        raise ValueError(
            f"labels must lie in 0..255 to be stored as uint8; got {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.uint8)


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise OutputError(f"output {path} must end with .nii.gz or .nii (a NIfTI file name)")


def _check_output_path(path: Path, input_path: Path | None) -> None:
    _nifti_suffix(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name ending in .nii.gz")
    if input_path is not None and path.exists():
        try:
            same = os.path.samefile(path, input_path)
        except OSError:
            same = path.resolve() == Path(input_path).resolve()
        if same:
            raise OutputError(
                f"refusing to write labels over the input {input_path}; choose another output path"
            )


def _atomic_save(img: Any, path: Path) -> None:
    """Save to a hidden temporary file beside ``path``, then rename it into place; clean up on failure."""
    import nibabel as nib

    suffix = _nifti_suffix(path)  # nibabel picks gzip or not from the temporary's name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, suffix=suffix) as tmp:
            nib.save(img, str(tmp))
    except OSError as exc:
        raise OutputError(_os_error_message(path, exc)) from exc


def _os_error_message(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        why = "the disk is full; free some space or write elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; choose a folder you can write to"
    else:
        why = f"{exc.strerror or exc}"
    return f"cannot write {path}: {why}"


# --------------------------------------------------------------------------------------------- folders


def find_nifti(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``.nii``/``.nii.gz`` files directly in ``folder``, sorted; hidden files are ignored.

    Returns an empty list for a folder without NIfTI files (callers decide whether that is an error);
    raises :class:`InputNotFoundError` when ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputNotFoundError(f"folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder} is not a folder; give a folder of .nii or .nii.gz files")
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.name.lower().endswith(NIFTI_SUFFIXES) and p.is_file()
    )


def case_name(path: str | os.PathLike[str]) -> str:
    """Case name of a file: ``case_00042`` for ``case_00042.nii.gz`` and ``case_00042/imaging.nii.gz``.

    KiTS19 names the files inside a case folder ``imaging`` and ``segmentation``; there the folder name is
    the case. Otherwise it is the file name without ``.nii``/``.nii.gz``.
    """
    path = Path(path)
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name in ("imaging", "segmentation") and path.parent.name not in ("", ".", ".."):
        return path.parent.name
    return name


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when both frame arrays cover the same physical voxel grid, whatever their stored axis order."""
    return a.data.shape == b.data.shape and bool(np.allclose(a.frame_affine, b.frame_affine, atol=atol))
