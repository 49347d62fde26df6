"""File-name conventions shared across the package: a leaf module, importing nothing.

The NIfTI suffixes are used by the loaders and writers (:mod:`kitsseg.io`), the label tables and the
``segment`` output checks; the KiTS19 case-folder names by the folder readers (:mod:`kitsseg.io.inputs`),
training (:mod:`kitsseg.training.data`) and the ``train`` command. One list each, here.
"""

from __future__ import annotations

#: Suffixes of NIfTI file names (matched case-insensitively), longest first so ``.nii.gz`` wins over
#: ``.nii``; the one list every module uses.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: The CT and the label file inside a KiTS19-layout case folder (``DATA_DIR/case_00042/imaging.nii.gz``).
IMAGE_NAMES = ("imaging.nii.gz", "imaging.nii")
LABEL_NAMES = ("segmentation.nii.gz", "segmentation.nii")
