"""Writing labels back: the input's own array layout and header, uint8, atomically.

:func:`save_labels` undoes the reorientation of :mod:`kitsseg.io.frame` and writes uint8 labels with the
input's affine, qform and sform (and codes); :func:`write_frame` writes a frame array in KiTS19 or a
converter layout (phantoms, test data). Both write through :mod:`kitsseg.io.atomic`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import bounding_box
from ..errors import OutputError
from ..names import NIFTI_SUFFIXES
from .atomic import atomic_output
from .frame import (
    _MAX_LABEL,
    FRAME_AXCODES,
    LAYOUT_AXCODES,
    Volume,
    _blocked_copy,
    _copy_threads,
    _inverse_ornt,
    kits19_affine,
)
from .labeltable import NIFTI_DESCRIP


def save_labels(
    labels: np.ndarray, like: Volume, path: str | os.PathLike[str], *, threads: int | None = None
) -> Path:
    """Write frame labels back in ``like``'s own array layout and header, as uint8, atomically.

    The affine, qform and sform (with their codes) of the input are kept; ``scl_slope``/``scl_inter``
    are reset so labels are stored exactly. Raises ``ValueError`` for labels of the wrong shape or values,
    :class:`OutputError` when ``path`` is the input itself or cannot be written (nothing is left behind).
    ``threads`` bounds the threads that reorder the labels (as in :func:`~kitsseg.io.load.load_ct`).
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
    # Viewers and tools read what the file is (kitsseg.io.labeltable): a label image, and which label is
    # which.
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
