"""Reading NIfTI volumes into the frame: every check a file can fail, one clear error each.

:func:`load_ct` and :func:`load_labels` open the header, check everything that can be checked before the
voxels are read (not NIfTI, truncated, 2D, several volumes, empty axis, bad spacing, too large for the
memory), then read the voxels into the frame of :mod:`kitsseg.io.frame`. A folder holding one DICOM series
is read by :mod:`kitsseg.io.dicom` into the same frame.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import InputNotFoundError, InvalidImageError, KitssegError, ResourceError
from .frame import (
    _MAX_LABEL,
    Volume,
    _blocked_copy,
    _check_finite,
    _check_hu,
    _copy_threads,
    _geometry,
    _spacing,
    _to_frame,
    _unreadable,
    quiet_nibabel,
)

if TYPE_CHECKING:
    import nibabel as nib
    from nibabel.arrayproxy import ArrayProxy


#: Largest finite float32, the dtype scaled CT values are computed in.
_FLOAT32_MAX = float(np.finfo(np.float32).max)



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
    :class:`ResourceError` (clearly too large for the memory available). Warns
    (:class:`~kitsseg.io.frame.VolumeWarning`) for oblique axes and for values that do not look like HU.

    ``keep_int16``: when the file stores small integers (int16, int8, uint8; most CTs) with slope 1 and an
    integral intercept, ``data`` is int16 HU: exactly the same values in half the memory, and half the
    bytes to write while reordering (``segment`` uses it: the 512x512x300 benchmark loads in 0.37-0.40 s
    instead of 0.42-0.78 s). Every other file still gives float32.

    ``threads``: at most this many threads reorder the voxels (default: the cores this process may use,
    at most 4; see ``_blocked_copy``).

    A folder that holds DICOM files is read as one CT series (:func:`kitsseg.io.dicom.load_dicom_ct`,
    the ``dicom`` extra), into the same frame.
    """
    path = Path(path)
    if path.is_dir():
        from .dicom import holds_dicom_series, load_dicom_ct

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
            # Decompression and reordering overlap, piece by piece (kitsseg.io.niftistream). Each piece is
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
