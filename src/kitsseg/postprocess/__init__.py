"""Post-processing of the two network masks (pure functions, arrays in and out) and tumor shape statistics.

The pipeline and its options are :mod:`.pipeline` (``postprocess``, ``PostprocessOptions``); its steps
:mod:`.fill`, :mod:`.kidneys` and :mod:`.tumors` share :mod:`.components`; :mod:`.shapestats` derives the
tumor shape bounds from a folder of labels (``kitsseg stats``).
"""
