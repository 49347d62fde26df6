"""What counts as a case in a folder given to ``segment``: NIfTI files, KiTS case folders, DICOM series.

Data arrives in three shapes and a user should not have to reshuffle any of them:

* ``FOLDER/<case>.nii.gz``: one CT per file (the case is the file name);
* ``FOLDER/case_00042/imaging.nii.gz``: the KiTS19/21/23 layout, as ``evaluate``, ``train`` and ``stats``
  read it (:data:`kitsseg.data.IMAGE_NAMES`; the case is the folder name). Unlike training, a case folder
  without ``segmentation.nii.gz`` is still a case: segmenting unlabelled cases is the point;
* ``FOLDER/<case>/`` holding the DICOM files of one CT series (the case is the folder name), read by
  :mod:`kitsseg.dicom_io`.

Each case is a path that :func:`kitsseg.volume.load_ct` reads and :func:`kitsseg.volume.case_name` names.
"""

from __future__ import annotations

import os
from pathlib import Path


def find_case_inputs(folder: str | os.PathLike[str]) -> list[Path]:
    """The cases in ``folder``, as input paths, sorted (NIfTI files first, then subfolders by name).

    Hidden files and folders are ignored; a subfolder that is neither a KiTS case folder nor a DICOM
    series is ignored too. Raises :class:`~kitsseg.errors.InputNotFoundError` when ``folder`` is missing.
    """
    from .data import IMAGE_NAMES
    from .dicom_io import holds_dicom_series
    from .volume import find_nifti

    folder = Path(folder)
    cases = list(find_nifti(folder))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image = next((sub / name for name in IMAGE_NAMES if (sub / name).is_file()), None)
        if image is not None:
            cases.append(image)
        elif holds_dicom_series(sub):
            cases.append(sub)
    return cases
