"""File-name conventions shared by modules that cannot import each other: a leaf module, importing nothing.

:mod:`kitsseg.volume` imports :mod:`kitsseg.labeltable` (a mask's NIfTI ``descrip``), so the label tables
cannot take the NIfTI suffixes from ``volume``; both take them from here (``volume`` re-exports them).
"""

from __future__ import annotations

#: Suffixes of NIfTI file names (matched case-insensitively), longest first so ``.nii.gz`` wins over
#: ``.nii``; the one list every module uses.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
