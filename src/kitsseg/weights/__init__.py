"""Weights files: their format (:mod:`.checkpoint`), the registry (:mod:`.registry`), resolving a name,
path or URL to a verified local file (:mod:`.resolve`), the cache and downloads, and import / list /
verify (:mod:`.manage`). Builds on :mod:`kitsseg.io` and :mod:`kitsseg.nets`.
"""
