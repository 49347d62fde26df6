"""DICOM input: one CT series in a folder becomes a :class:`~kitsseg.io.frame.Volume` in the internal frame.

Researchers get CT from PACS or TCIA as a folder of DICOM files, one per slice. The files say where each
slice lies (ImagePositionPatient) and how it is turned (ImageOrientationPatient), but not in which order
or at which spacing they form a volume: that has to be worked out, and the classic ways to get it wrong
(sorting by file name or InstanceNumber, spacing from SliceThickness, mixing two series, a gantry tilt read
as if it were upright) give a volume that looks right and is not. So, with pydicom (the ``dicom`` extra):

* files are recognised by their ``DICM`` preamble (names with or without ``.dcm``), DICOMDIR skipped;
* the folder must hold exactly one series (SeriesInstanceUID) and it must be CT;
* slices are sorted by their position along the slice normal (cross product of the two orientation
  vectors dotted with the position), and the spacing is measured from those positions;
* HU = stored value * RescaleSlope + RescaleIntercept, slice by slice.

What cannot be read exactly is refused with one :class:`DicomSeriesError` line, never turned into a wrong
volume: several series, not CT, multi-frame objects, a gantry tilt (slices shifted sideways along the
stack, see ``_TILT_TOL``), missing slices (a gap of at least ``_MISSING_GAP`` slice steps), uneven spacing
(a slice further than ``_POSITION_TOL`` of a step from the evenly spaced grid through the first and last
slice), mixed orientations or sizes, and two slices at the same position.

The stored array is laid out as SimpleITK and dcm2niix write a series to NIfTI: ``(column, row, slice)``
with slices in increasing position along the normal, and the LPS geometry turned into a RAS affine (x and y
negated), qform and sform codes 1. :func:`kitsseg.io.save.save_labels` therefore writes a mask with the
series' geometry, as a converter would, and the frame array is the same as that of the converted NIfTI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidImageError, KitssegError
from .frame import Volume

#: The pip command that installs the optional DICOM support.
INSTALL_HINT = 'pip install "kitsseg[dicom]"'
#: A slice may lie at most this fraction of the slice spacing off the evenly spaced grid through the first
#: and the last slice (at least ``_POSITION_TOL_MM``): rounding of the positions in the files passes, a
#: slice really out of place does not.
_POSITION_TOL = 0.05
_POSITION_TOL_MM = 0.01
#: A gap of at least this many slice steps (the median distance between neighbours) is missing slices.
_MISSING_GAP = 1.5
#: Positions may drift sideways (off the slice normal) by at most this fraction of the smallest pixel
#: spacing over the whole stack; more is a gantry tilt, whose slices a plain stack would shear.
_TILT_TOL = 0.1
#: Tolerance on the orientation vectors (unit length, perpendicular, equal in every slice).
_ORIENT_TOL = 1e-4
#: Relative tolerance on PixelSpacing being equal in every slice.
_SPACING_RTOL = 1e-4
#: SOP class of a DICOMDIR (a folder index, not an image).
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Files whose names say they are not DICOM are not even opened.
_NOT_DICOM = (".nii", ".nii.gz", ".json", ".csv", ".txt", ".md", ".png", ".jpg", ".ctbl", ".zip", ".lock")


class DicomSeriesError(InvalidImageError):
    """A DICOM folder does not hold exactly one CT series that can be stacked without resampling."""


class MissingExtraError(KitssegError, ImportError):
    """An optional part of kitsseg is used but its extra is not installed (``pip install "kitsseg[X]"``)."""


def require_pydicom() -> Any:
    """The ``pydicom`` module, or one clear error line saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise MissingExtraError(
            f"reading DICOM needs pydicom, which is not installed; install it with {INSTALL_HINT}"
        ) from None
    return pydicom


# ----------------------------------------------------------------------------------------------- finding


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts like a DICOM file (128-byte preamble + ``DICM``)."""
    path = Path(path)
    name = path.name.lower()
    if name.startswith(".") or name.endswith(_NOT_DICOM):
        return False
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The DICOM files directly in ``folder`` (not in subfolders), sorted by name."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries if is_dicom_file(p)]


def holds_dicom_series(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` directly holds at least one DICOM file (then it is read as one series).

    Needs no pydicom: only the first 132 bytes of files are read, until the first DICOM file is found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    try:
        return any(is_dicom_file(p) for p in folder.iterdir())
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- series


@dataclass(eq=False)
class DicomSeries:
    """One CT series, its slices sorted along the slice normal, with the geometry of its stored array.

    ``headers`` are the pydicom datasets without pixel data (what a DICOM-SEG references), ``files`` the
    matching paths. ``affine`` is the RAS voxel-to-world affine of the stored ``(column, row, slice)``
    array of shape ``shape``, as SimpleITK or dcm2niix write it; ``spacing`` is ``(column, row, slice)``
    in mm, the slice spacing measured from the positions.
    """

    folder: Path
    files: list[Path]
    headers: list[Any]
    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)

    def __repr__(self) -> str:
        return f"DicomSeries({str(self.folder)!r}, slices={len(self.files)}, shape={self.shape})"


@dataclass(eq=False, repr=False)
class DicomVolume(Volume):
    """A CT volume read from a DICOM series: a :class:`Volume` that also keeps the series' headers."""

    series: DicomSeries | None = None


def read_series(folder: str | os.PathLike[str]) -> DicomSeries:
    """Read the headers of the one CT series in ``folder``, check them and sort the slices (no pixels).

    Raises :class:`DicomSeriesError` for everything that cannot be stacked exactly (see the module
    docstring), :class:`MissingExtraError` without pydicom.
    """
    pydicom = require_pydicom()
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise DicomSeriesError(
            f"{folder} holds no DICOM files (files starting with the DICM preamble); give a folder with the "
            "files of one CT series"
        )
    by_series: dict[str, list[tuple[Path, Any]]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file: pydicom raises many types
            raise DicomSeriesError(
                f"{path} is not a readable DICOM file ({type(exc).__name__}: {str(exc)[:150]}); "
                "copy or export it again"
            ) from exc
        if str(getattr(ds, "SOPClassUID", "")) == _DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            raise DicomSeriesError(
                f"{path} has no SeriesInstanceUID (a truncated file, or not an image); "
                "export or copy it again, or remove it from the folder"
            )
        by_series.setdefault(uid, []).append((path, ds))
    if not by_series:
        raise DicomSeriesError(f"{folder} holds only a DICOMDIR, no images; give the folder with the slices")
    if len(by_series) > 1:
        listed = "; ".join(_describe_series(uid, items) for uid, items in sorted(by_series.items())[:4])
        more = f"; and {len(by_series) - 4} more" if len(by_series) > 4 else ""
        raise DicomSeriesError(
            f"{folder} holds {len(by_series)} DICOM series ({listed}{more}); kitsseg reads one series per "
            "folder: put each series in its own folder (in folder mode, each subfolder is a case)"
        )
    (items,) = by_series.values()
    return _check_and_sort(folder, items)


def _describe_series(uid: str, items: list[tuple[Path, Any]]) -> str:
    ds = items[0][1]
    modality = str(getattr(ds, "Modality", "") or "?")
    description = str(getattr(ds, "SeriesDescription", "") or "").strip()
    text = f"{modality}, {len(items)} file(s), UID {uid or '?'}"
    return text + (f", {description!r}" if description else "")


def _check_and_sort(folder: Path, items: list[tuple[Path, Any]]) -> DicomSeries:
    first_path, first = items[0]
    modality = str(getattr(first, "Modality", "") or "")
    if modality != "CT":
        raise DicomSeriesError(
            f"{folder} holds a {modality or 'modality-less'} series ({first_path.name} and "
            f"{len(items) - 1} more); kitsseg segments CT only"
        )
    for path, ds in items:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            raise DicomSeriesError(
                f"{path} is a multi-frame DICOM object ({frames} frames, e.g. Enhanced CT); kitsseg reads "
                "one file per slice: convert it with dcm2niix and segment the NIfTI"
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if getattr(ds, keyword, None) in (None, ""):
                raise DicomSeriesError(
                    f"{path} has no {keyword}; without it the slice cannot be placed in a volume"
                )
        if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
            raise DicomSeriesError(f"{path} is a colour image (SamplesPerPixel > 1); expected a CT slice")
    if len(items) < 2:
        raise DicomSeriesError(
            f"{folder} holds a single slice ({first_path.name}); a CT volume needs a stack of axial slices"
        )

    orient = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
    bad = np.nonzero(np.abs(orient - orient[0]).max(axis=1) > _ORIENT_TOL)[0]
    if bad.size:
        raise DicomSeriesError(
            f"{folder}: slices have different orientations ({first_path.name} and {items[bad[0]][0].name}); "
            "is a localizer (scout) image mixed into the series? Keep only the axial slices"
        )
    x_dir, y_dir = orient[0, :3], orient[0, 3:]
    if (  # NaN compares False: without the isfinite test a NaN orientation got through to a traceback
        not np.all(np.isfinite(orient[0]))
        or abs(np.linalg.norm(x_dir) - 1) > 1e-3
        or abs(np.linalg.norm(y_dir) - 1) > 1e-3
        or abs(float(x_dir @ y_dir)) > 1e-3
    ):
        raise DicomSeriesError(
            f"{first_path}: ImageOrientationPatient {[float(v) for v in orient[0]]} is not two perpendicular "
            "unit vectors; the header is corrupt"
        )
    x_dir, y_dir = x_dir / np.linalg.norm(x_dir), y_dir / np.linalg.norm(y_dir)
    normal = np.cross(x_dir, y_dir)
    normal /= np.linalg.norm(normal)
    size = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(size) > 1:
        raise DicomSeriesError(f"{folder}: slices have different sizes {sorted(size)}; expected one size")
    pixel = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in items])
    if not np.allclose(pixel, pixel[0], rtol=_SPACING_RTOL, atol=0) or np.any(pixel[0] <= 0):
        raise DicomSeriesError(
            f"{folder}: PixelSpacing differs between slices or is not positive "
            f"({sorted({tuple(float(v) for v in p) for p in pixel})[:3]}); expected one positive spacing"
        )

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    bad = np.nonzero(~np.isfinite(positions).all(axis=1))[0]
    if bad.size:
        raise DicomSeriesError(
            f"{items[bad[0]][0]} has a non-finite ImagePositionPatient "
            f"{[float(v) for v in positions[bad[0]]]}; the slice cannot be placed in a volume: the header "
            "is corrupt"
        )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    items = [items[i] for i in order]
    positions, along = positions[order], along[order]
    names = [path.name for path, _ in items]
    steps = np.diff(along)
    same = np.nonzero(steps <= 1e-3)[0]
    if same.size:
        i = int(same[0])
        raise DicomSeriesError(
            f"{folder}: {names[i]} and {names[i + 1]} lie at the same slice position ({along[i]:.3f} mm); "
            "the folder holds two acquisitions or copies of a slice: keep one series of distinct slices"
        )
    _check_tilt(folder, positions, along, normal, float(pixel[0].min()))
    step = float(np.median(steps))
    gaps = np.nonzero(steps >= _MISSING_GAP * step)[0]
    if gaps.size:
        missing = int(sum(round(float(steps[i]) / step) - 1 for i in gaps))
        i = int(gaps[0])
        raise DicomSeriesError(
            f"{folder}: about {missing} slice(s) are missing: {names[i]} and {names[i + 1]} are "
            f"{steps[i]:.3f} mm apart where the other slices are {step:.3f} mm apart; export the whole series"
        )
    spacing = float(along[-1] - along[0]) / (len(items) - 1)
    off = np.abs(along - (along[0] + spacing * np.arange(len(items))))
    tol = max(_POSITION_TOL * spacing, _POSITION_TOL_MM)
    if off.max() > tol:
        k = int(np.argmax(off))
        raise DicomSeriesError(
            f"{folder}: the slices are unevenly spaced ({steps.min():.3f} to {steps.max():.3f} mm apart; "
            f"{names[k]} lies {off[k]:.3f} mm off an even grid, more than {tol:.3f} mm); kitsseg does not "
            "resample: resample the series to even spacing first"
        )

    n_rows, n_cols = size.pop()
    row_mm, col_mm = (float(v) for v in pixel[0])
    lps = np.eye(4)
    lps[:3, 0] = x_dir * col_mm  # stored axis 0: column index, along the first orientation vector
    lps[:3, 1] = y_dir * row_mm  # stored axis 1: row index
    lps[:3, 2] = normal * spacing  # stored axis 2: slices in increasing position along the normal
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS (NIfTI)
    return DicomSeries(
        folder=folder,
        files=[path for path, _ in items],
        headers=[ds for _, ds in items],
        affine=affine,
        shape=(n_cols, n_rows, len(items)),
        spacing=(col_mm, row_mm, spacing),
    )


def _check_tilt(
    folder: Path, positions: np.ndarray, along: np.ndarray, normal: np.ndarray, pixel: float
) -> None:
    """Refuse slices that shift sideways along the stack (gantry tilt): stacked upright they would shear."""
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    sideways = np.linalg.norm(offsets, axis=1)
    if sideways.max() > _TILT_TOL * pixel:
        depth = float(along[-1] - along[0])
        angle = float(np.degrees(np.arctan2(sideways[-1], depth))) if depth > 0 else 90.0
        raise DicomSeriesError(
            f"{folder}: the slices shift sideways by up to {sideways.max():.2f} mm along the stack (a gantry "
            f"tilt of about {angle:.1f} degrees); read as a plain stack the volume would be sheared: correct "
            "the tilt first (dcm2niix does when converting) and segment the NIfTI"
        )


def stored_shape(folder: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Shape of the series' stored array ``(columns, rows, slices)``, from the headers only."""
    return read_series(folder).shape


# ----------------------------------------------------------------------------------------------- voxels


def load_dicom_ct(folder: str | os.PathLike[str], *, keep_int16: bool = False) -> DicomVolume:
    """Load the one CT series in ``folder`` as HU in the internal frame (float32, or int16, see below).

    ``keep_int16`` as in :func:`kitsseg.io.load.load_ct`: when every slice has slope 1 and an integral
    intercept and the HU fit in int16 (most CT), ``data`` is int16 HU (the same values, half the memory).
    """
    from .frame import ct_from_stored

    pydicom = require_pydicom()
    series = read_series(folder)
    n_cols, n_rows, n_slices = series.shape
    scaling = [_rescale(ds) for ds in series.headers]
    exact_int = all(s == 1.0 and i == round(i) for s, i in scaling)
    stack = np.empty((n_slices, n_rows, n_cols), dtype=np.int16 if keep_int16 and exact_int else np.float32)
    for k, (path, (slope, inter)) in enumerate(zip(series.files, scaling, strict=True)):
        stored = _pixels(pydicom, path, (n_rows, n_cols))
        if stack.dtype == np.int16:
            hu = stored.astype(np.int32) + int(inter)
            if hu.size and (hu.min() < -(2**15) or hu.max() > 2**15 - 1):
                stack = stack.astype(np.float32)  # rare: the values leave int16, keep them exact
                stack[k] = hu
            else:
                stack[k] = hu
        else:
            stack[k] = stored.astype(np.float32) * np.float32(slope) + np.float32(inter)
    # (slice, row, column) in memory is the stored (column, row, slice) array in Fortran order.
    volume = ct_from_stored(stack.transpose(2, 1, 0), series.affine, series.folder)
    return DicomVolume(volume.data, volume.spacing, volume.geometry, volume.path, series=series)


def _rescale(ds: Any) -> tuple[float, float]:
    if "ModalityLUTSequence" in ds:
        raise DicomSeriesError(
            f"{ds.filename} maps its values with a Modality LUT, which kitsseg does not apply; "
            "convert the series with dcm2niix and segment the NIfTI"
        )
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise DicomSeriesError(f"{ds.filename} has a non-finite RescaleSlope or RescaleIntercept")
    return slope, inter


def _pixels(pydicom: Any, path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The stored values of one slice (before rescaling), or one clear error when they cannot be read."""
    try:
        ds = pydicom.dcmread(str(path))
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing decoders and truncated data raise many types
        syntax = ""
        try:
            syntax = f" (transfer syntax {ds.file_meta.TransferSyntaxUID.name})"
        except Exception:  # noqa: BLE001
            pass
        raise DicomSeriesError(
            f"cannot read the pixel data of {path}{syntax}: {type(exc).__name__}: {str(exc)[:150]}; a "
            "compressed series needs a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) "
            "or decompress it first (gdcmconv --raw)"
        ) from exc
    if arr.shape != shape:
        raise DicomSeriesError(f"{path} holds pixels of shape {arr.shape}, expected {shape} (Rows, Columns)")
    return arr
