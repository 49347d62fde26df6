"""Training on sets of real CT slices: the recipe that produces the shipped weights.

``kitsseg train --config configs/starter.json`` (or :func:`kitsseg.training.slicetrain.train_from_config`)
trains both stages from the config file, with every lever of the recipe an option of the config:
spacing-aware slices (:class:`kitsseg.preprocess.SliceGrid`, the same geometry inference uses),
contrast-phase and scanner augmentation (:mod:`.phases`), copy-paste of real tumors (:mod:`.copypaste`),
synthetic tumors (:mod:`kitsseg.synthtumor`), kidney-free negatives and tumor-band jitter.
Training on whole KiTS19 volumes is :mod:`kitsseg.train`.
"""
