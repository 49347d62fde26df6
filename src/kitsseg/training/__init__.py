"""Training the two U-Nets: the top of the library (it may use every other subpackage but the CLI).

Two ways in, sharing the losses (:mod:`.losses`), augmentation (:mod:`.augment`, :mod:`.phases`,
:mod:`.copypaste`, :mod:`.synthtumor`) and the weights format:

* On sets of real CT slices, the recipe that produces the shipped weights: ``kitsseg train --config
  configs/starter.json`` (or :func:`kitsseg.training.slicetrain.train_from_config`) trains both stages
  from the config file (:mod:`.recipe`), with every lever of the recipe an option of the config:
  spacing-aware slices (:mod:`.slicesets` through :class:`kitsseg.inference.preprocess.SliceGrid`, the
  same geometry inference uses), contrast-phase and scanner augmentation, copy-paste of real tumors,
  synthetic tumors, kidney-free negatives and tumor-band jitter.
* On whole KiTS19 volumes (``kitsseg train DATA_DIR``, ``kitsseg.train``): :mod:`.train` runs both
  stages over the slice cache (:mod:`.slicecache`, :mod:`.data`) with the options of :mod:`.config`, the
  loop of :mod:`.loop`, the run folder's files of :mod:`.runfiles`, and torchrun (:mod:`.distributed`).
"""
