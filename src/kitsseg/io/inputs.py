"""What counts as a case in a folder (NIfTI files, KiTS case folders, DICOM series), and what it is called.

Data arrives in three shapes and a user should not have to reshuffle any of them:

* ``FOLDER/<case>.nii.gz``: one CT per file (the case is the file name);
* ``FOLDER/case_00042/imaging.nii.gz``: the KiTS19/21/23 layout, as ``evaluate``, ``train`` and ``stats``
  read it (:data:`kitsseg.names.IMAGE_NAMES`; the case is the folder name). Unlike training, a case folder
  without ``segmentation.nii.gz`` is still a case: segmenting unlabelled cases is the point;
* ``FOLDER/<case>/`` holding the DICOM files of one CT series (the case is the folder name), read by
  :mod:`kitsseg.io.dicom`.

Each case is a path that :func:`kitsseg.io.load.load_ct` reads and :func:`case_name` names;
:func:`find_nifti` lists the NIfTI files of a folder (``evaluate`` and ``stats`` read label folders with it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputNotFoundError
from ..names import IMAGE_NAMES, NIFTI_SUFFIXES


def find_case_inputs(folder: str | os.PathLike[str]) -> list[Path]:
    """The cases in ``folder``, as input paths, sorted (NIfTI files first, then subfolders by name).

    Hidden files and folders are ignored; a subfolder that is neither a KiTS case folder nor a DICOM
    series is ignored too. Raises :class:`~kitsseg.errors.InputNotFoundError` when ``folder`` is missing.
    """
    from .dicom import holds_dicom_series

    folder = Path(folder)
    cases = list(find_nifti(folder))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image = next((sub / name for name in IMAGE_NAMES if (sub / name).is_file()), None)
        if image is not None:
            cases.append(image)
        elif holds_dicom_series(sub):
            cases.append(sub)
    return cases


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
