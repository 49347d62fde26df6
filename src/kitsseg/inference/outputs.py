"""Where ``segment`` writes, and the checks made before any work: a mistake costs seconds, not a model run.

Outputs that would overwrite an input (or link to one), collide with each other, or cannot be written are
refused before the model loads; folders a refused run created are removed again, so no empty output
folder is left behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..names import NIFTI_SUFFIXES


def is_nifti_name(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a NIfTI file: ``.nii`` or ``.nii.gz`` after a non-empty stem."""
    name = Path(path).name.lower()
    return any(name.endswith(s) and len(name) > len(s) for s in NIFTI_SUFFIXES)


def check_output_name(output_path: str | os.PathLike[str]) -> None:
    """Refuse a mask name that is only a suffix (``-o .nii.gz``); reads and creates nothing."""
    name = Path(output_path).name
    if name.lower() in (*NIFTI_SUFFIXES, ".dcm"):
        raise OutputError(
            f"output {output_path} has no name before {name}; give a file name such as case_seg.nii.gz"
        )


def default_output(input_path: str | os.PathLike[str]) -> Path:
    """``<folder>/<name>_seg.nii.gz`` beside the input (used when no output path is given)."""
    from ..io.inputs import case_name

    p = Path(input_path)
    return p.with_name(f"{case_name(p)}_seg.nii.gz")


def report_path_for(output_path: str | os.PathLike[str]) -> Path:
    """The report beside a mask: ``mask.json`` for ``mask.nii.gz``, ``mask.nii`` or ``mask.dcm``."""
    p = Path(output_path)
    name = p.name
    for suffix in (*NIFTI_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    return p.with_name(name + ".json")


def _same_file(a: Path, b: Path) -> bool:
    from ..io.guard import same_file  # the same inode (symlinks and hard links), else the same resolved path

    return same_file(a, b)


def remove_empty_folders(created: Sequence[Path]) -> None:
    """Remove folders this run created (deepest first) that are still empty, e.g. after a refused input."""
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty


def _check_writable(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` if needed and make sure files can be created in it (before any work).

    Returns the folders it created, so a run refused later can remove them again
    (:func:`remove_empty_folders`) instead of leaving an empty output folder behind.
    """
    created = [p for p in (*reversed(folder.parents), folder) if not p.exists()]
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # mkdir would only say "File exists" or "Not a directory": name the culprit
        raise OutputError(
            f"cannot create the {what} folder {folder}: {blocker} is a file, not a folder; "
            "choose another output path"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the {what} folder {folder}: {exc.strerror or exc}; "
            "choose a folder you can write to"
        ) from exc
    if not folder.is_dir():
        raise OutputError(f"the {what} folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        remove_empty_folders(created)
        raise OutputError(f"the {what} folder {folder} is not writable; choose a folder you can write to")
    return created


def check_outputs(
    input_path: Path,
    output_path: Path,
    report_path: Path,
    preview_path: Path | None = None,
    reference: Path | None = None,
    weights: Path | None = None,
) -> list[Path]:
    """Refuse outputs that would overwrite an input (or link to one, ``weights`` included) or each other,
    or that cannot be written. Returns the folders created for them (see :func:`remove_empty_folders`)."""
    check_output_name(output_path)
    from ..io.dicom import holds_dicom_series
    from ..io.dicom_seg import is_seg_name

    dicom_input = holds_dicom_series(input_path)
    if not is_nifti_name(output_path):
        if not is_seg_name(output_path):
            raise OutputError(
                f"output {output_path} must end in .nii.gz or .nii (a labelled NIfTI is written), "
                "or in .dcm for a DICOM-SEG of a DICOM series"
            )
        if not dicom_input:
            raise OutputError(
                f"output {output_path} asks for a DICOM-SEG (.dcm), which references its source DICOM "
                f"series, but the input {input_path} is not a DICOM series; write a NIfTI mask (.nii.gz)"
            )
    protected = [("input", input_path)] + ([("reference", reference)] if reference is not None else [])
    if weights is not None:
        protected.append(("weights", weights))
    outputs = [("output", output_path), ("report", report_path)]
    if preview_path is not None:
        outputs.append(("preview", preview_path))
    for out_kind, out in outputs:
        for in_kind, src in protected:
            if _same_file(out, src):
                raise OutputError(
                    f"the {out_kind} path {out} is the {in_kind} file; inputs are never overwritten, "
                    "choose another output name"
                )
    for i, (kind_a, a) in enumerate(outputs):
        for kind_b, b in outputs[i + 1 :]:
            if _same_file(a, b):
                raise OutputError(
                    f"the {kind_a} and {kind_b} paths are the same file {a}; give them different names"
                )
    for out_kind, out in outputs:
        if out.is_dir():
            raise OutputError(f"the {out_kind} path {out} is a folder; give a file name")
        if dicom_input and _same_file(out.parent, input_path):
            raise OutputError(
                f"the {out_kind} path {out} lies in the input DICOM folder; inputs are never modified (and a "
                "file there would join the series): write it to another folder"
            )
    created: list[Path] = []
    try:
        for out_kind, out in outputs:
            created += _check_writable(out.parent, out_kind)
    except BaseException:
        remove_empty_folders(created)
        raise
    return created
