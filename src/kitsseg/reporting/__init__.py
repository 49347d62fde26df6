"""What a segmentation run tells its user: the per-case report, the cohort table, the preview montage.

Below :mod:`kitsseg.inference`, which writes them; reads the post-processing results it describes.
"""
