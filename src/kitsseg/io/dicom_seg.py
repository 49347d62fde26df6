"""DICOM-SEG output: the labels as a DICOM Segmentation object that references its source CT series.

A mask that a PACS, OHIF or 3D Slicer's DICOM module can load next to the CT has to be DICOM itself, with
each segment described in standard codes. highdicom (the ``dicom`` extra) builds the object and checks it
against the IOD; kitsseg supplies one segment per label, coded in SNOMED CT as DICOM's CID 7150/7151
lists them:

* ``kidney`` (1): category *Anatomical Structure* (SCT 91723000), type *Kidney* (SCT 64033007);
* ``tumor`` (2): category *Morphologically Abnormal Structure* (SCT 49755003), type *Neoplasm*
  (SCT 108369006), anatomic region *Kidney*: KiTS's "tumor" covers every renal mass it labels.

The object is a BINARY segmentation of the source series: one frame per source slice that holds a segment
(empty frames are left out), each frame referencing its source image (SOP Instance UID), the whole
object referencing the series (ReferencedSeriesSequence) with the series' own geometry and Frame of
Reference. A series without a FrameOfReferenceUID (some anonymised exports) gets one derived from its
SeriesInstanceUID, the same on every run; the report says so.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidImageError, OutputError
from .atomic import atomic_output
from .labeltable import LABELS

if TYPE_CHECKING:
    from .frame import Volume

#: Suffix of an output path that asks for a DICOM-SEG instead of a NIfTI.
SEG_SUFFIX = ".dcm"
#: Added to the source SeriesNumber to number the segmentation series.
_SERIES_OFFSET = 1000


def is_seg_name(path: str | os.PathLike[str]) -> bool:
    """Whether an output path asks for a DICOM-SEG (it ends in ``.dcm``)."""
    return str(path).lower().endswith(SEG_SUFFIX)


def require_highdicom() -> Any:
    """The ``highdicom`` module, or one clear error line saying how to install it."""
    from .dicom import INSTALL_HINT, MissingExtraError

    try:
        import highdicom
    except ImportError:
        raise MissingExtraError(
            f"writing DICOM-SEG needs highdicom, which is not installed; install it with {INSTALL_HINT}"
        ) from None
    return highdicom


def segment_descriptions(hd: Any, algorithm_name: str, algorithm_version: str) -> list[Any]:
    """The two segment descriptions (kidney, tumor) with their SNOMED CT codes and display colours."""
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    coded = {
        "kidney": (codes.SCT.AnatomicalStructure, codes.SCT.Kidney, None),
        "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, [codes.SCT.Kidney]),
    }
    out = []
    for label in LABELS[1:]:
        category, kind, regions = coded[label.name]
        desc = hd.seg.SegmentDescription(
            segment_number=label.value,
            segment_label=label.name,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=regions,
        )
        desc.RecommendedDisplayCIELabValue = _dicom_lab(label.rgb)
        out.append(desc)
    return out


def _dicom_lab(rgb: tuple[int, int, int]) -> list[int]:
    """An sRGB colour as DICOM's scaled CIELab triplet (L* 0..100, a* and b* -128..127, to 0..65535)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(1, 1, 3) / 255.0)[0, 0]
    scaled = (lab[0] / 100.0, (lab[1] + 128.0) / 255.0, (lab[2] + 128.0) / 255.0)
    values = [v * 65535.0 for v in scaled]
    return [int(np.clip(round(v), 0, 65535)) for v in values]


def write_dicom_seg(
    labels: np.ndarray,
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    algorithm_name: str = "kitsseg",
    algorithm_version: str | None = None,
) -> list[str]:
    """Write frame ``labels`` (0/1/2, the shape of ``volume.data``) as a DICOM-SEG of ``volume``'s series.

    Returns notes for the report (e.g. a derived Frame of Reference). Raises :class:`InvalidImageError`
    when ``volume`` was not read from DICOM, :class:`OutputError` when ``path`` cannot be written (nothing
    is left behind), :class:`~kitsseg.io.dicom.MissingExtraError` without highdicom.
    """
    from .._version import __version__
    from .dicom import DicomVolume

    path = Path(path)
    series = volume.series if isinstance(volume, DicomVolume) else None
    if series is None:
        raise InvalidImageError(
            f"a DICOM-SEG ({path.name}) references its source DICOM series, but the input was not DICOM; "
            "write a NIfTI mask (.nii.gz) instead"
        )
    labels = np.asarray(labels)
    if labels.shape != volume.data.shape:
        raise ValueError(f"labels have shape {labels.shape}, the volume {volume.data.shape} (z, row, col)")
    if labels.size and int(labels.max()) > LABELS[-1].value:
        raise ValueError(f"labels must be 0..{LABELS[-1].value}; got up to {int(labels.max())}")
    hd = require_highdicom()
    from pydicom.uid import generate_uid

    # The stored (column, row, slice) layout, transposed to (slice, row, column) in the series' order.
    stack = np.ascontiguousarray(volume.geometry.to_stored(labels).transpose(2, 1, 0), dtype=np.uint8)
    notes: list[str] = []
    sources = series.headers
    if not str(getattr(sources[0], "FrameOfReferenceUID", "") or ""):
        frame_uid = generate_uid(entropy_srcs=[series.series_uid, "kitsseg-frame-of-reference"])
        sources = [copy.deepcopy(ds) for ds in sources]
        for ds in sources:
            ds.FrameOfReferenceUID = frame_uid
        notes.append(
            f"the source series has no FrameOfReferenceUID; the DICOM-SEG uses {frame_uid}, derived from its "
            "SeriesInstanceUID (viewers match it to the CT through the referenced images)"
        )
    version = algorithm_version or __version__
    try:
        source_number = int(getattr(sources[0], "SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        source_number = 0
    with _quiet_highdicom():
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=stack,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(hd, algorithm_name, version),
            series_instance_uid=hd.UID(),
            series_number=source_number + _SERIES_OFFSET,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="kitsseg",
            manufacturer_model_name=algorithm_name[:64],
            software_versions=f"kitsseg {__version__}",
            device_serial_number="none",
            content_label="KIDNEY_TUMOR",
            content_description="kitsseg kidney and kidney tumor segmentation",
        )
    seg.SeriesDescription = "kitsseg kidney and tumor"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, suffix=SEG_SUFFIX) as tmp:
            seg.save_as(str(tmp))
    except OSError as exc:
        raise OutputError(f"cannot write the DICOM-SEG {path}: {exc.strerror or exc}") from exc
    return notes


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs what it decides (e.g. to keep all frames of an empty mask); kitsseg reports itself."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
