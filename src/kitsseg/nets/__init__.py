"""The networks and where they run: the U-Net, BatchNorm folding, the fused oneDNN path, devices, threads.

Imports only the leaf modules (no images, no weights files): :mod:`kitsseg.weights` builds on it.
"""
