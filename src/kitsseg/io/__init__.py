"""Images and files in and out: the one internal frame, NIfTI and DICOM reading and writing, atomic outputs.

The lowest subpackage above the leaf modules (``errors``, ``env``, ``names``, ``arrays``): it imports no
other subpackage. Every image enters through :mod:`.load` (or :mod:`.dicom`) into the frame of
:mod:`.frame` and leaves through :mod:`.save` (or :mod:`.dicom_seg`); every output file goes through
:mod:`.atomic`. Modules import from the defining module (``from kitsseg.io.load import load_ct``); this
file imports nothing, so ``import kitsseg.io.atomic`` stays light.
"""
