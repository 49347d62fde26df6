"""Segmenting CTs: preprocessing onto the model grid, the two-stage prediction, and the library entry points
``segment`` (:mod:`.segment`, one file) and ``segment_folder`` (:mod:`.batch`), with the output checks made
before any work (:mod:`.outputs`) and the input checks reported after it (:mod:`.inputchecks`).
"""
