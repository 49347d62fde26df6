"""The label values kitsseg writes, their names and colours, and the label tables viewers load.

A NIfTI mask is only numbers: without a table, 3D Slicer shows "Segment_1" and "Segment_2" and ITK-SNAP
"Label 1" and "Label 2". Beside each NIfTI mask ``<name>.nii.gz`` two small text files name them:

* ``<name>.ctbl``: a 3D Slicer colour table (discrete lookup table, ``index name R G B A``), loaded with
  *Add Data* and chosen as the labelmap's colour table, or given to *Import labelmap to segmentation*;
* ``<name>.label.txt``: an ITK-SNAP label description file (*Segmentation > Import Label Descriptions*).

The mask itself says what it is: intent code ``NIFTI_INTENT_LABEL`` (1002) and a ``descrip`` naming the
labels (set by :func:`kitsseg.io.save.save_labels`). The colours are those of the PNG preview
(:mod:`kitsseg.reporting.preview`): kidney green, tumor red. DICOM-SEG outputs carry the same names with
SNOMED CT codes instead (:mod:`kitsseg.io.dicom_seg`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..names import NIFTI_SUFFIXES
from .atomic import write_user_output


@dataclass(frozen=True)
class Label:
    """One label value of a kitsseg mask."""

    value: int
    name: str
    rgb: tuple[int, int, int]


#: The labels of a kitsseg mask (KiTS19 convention), background first.
LABELS: tuple[Label, ...] = (
    Label(0, "background", (0, 0, 0)),
    Label(1, "kidney", (0, 200, 0)),
    Label(2, "tumor", (230, 0, 0)),
)
#: The NIfTI ``descrip`` field of every mask (at most 80 bytes).
NIFTI_DESCRIP = "kitsseg labels: 0 background, 1 kidney, 2 tumor"
#: The NIfTI intent code of a label image (``NIFTI_INTENT_LABEL``).
NIFTI_INTENT_LABEL = 1002
#: Suffixes of the two table files written beside a mask.
SLICER_SUFFIX = ".ctbl"
ITKSNAP_SUFFIX = ".label.txt"


def slicer_ctbl() -> str:
    """The 3D Slicer colour table (``.ctbl``): ``index name R G B A`` per line, background transparent."""
    lines = ["# Color table file kitsseg labels", f"# {len(LABELS)} values"]
    for label in LABELS:
        alpha = 0 if label.value == 0 else 255
        lines.append(f"{label.value} {label.name} {label.rgb[0]} {label.rgb[1]} {label.rgb[2]} {alpha}")
    return "\n".join(lines) + "\n"


def itksnap_labels() -> str:
    """The ITK-SNAP label description file: ``IDX R G B A VIS MSH "LABEL"`` per line."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File (written by kitsseg)",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "################################################",
    ]
    for label in LABELS:
        shown = 0 if label.value == 0 else 1
        name = "Clear Label" if label.value == 0 else label.name
        r, g, b = label.rgb
        lines.append(f'{label.value:5d} {r:5d} {g:4d} {b:4d} {shown:8d} {shown:2d} {shown:2d}    "{name}"')
    return "\n".join(lines) + "\n"


def table_paths(mask: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<name>.ctbl, <name>.label.txt)`` beside the mask ``<name>.nii.gz`` (or ``.nii``)."""
    mask = Path(mask)
    stem = mask.name
    for suffix in NIFTI_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return mask.with_name(stem + SLICER_SUFFIX), mask.with_name(stem + ITKSNAP_SUFFIX)


def write_label_tables(mask: str | os.PathLike[str]) -> list[Path]:
    """Write both label tables beside ``mask``, atomically; returns their paths (Slicer's first)."""
    slicer, itksnap = table_paths(mask)
    write_user_output(slicer, slicer_ctbl(), f"the label table {slicer}")
    write_user_output(itksnap, itksnap_labels(), f"the label table {itksnap}")
    return [slicer, itksnap]
