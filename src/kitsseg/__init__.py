"""kitsseg: kidney and kidney-tumor segmentation in abdominal CT.

Two 2D U-Nets on axial slices (kidney+tumor, then tumor only), anatomical and statistical
post-processing, and a labelled NIfTI (0 background, 1 kidney, 2 tumor) with a report of volumes.
Heavy modules (torch, nibabel) are imported lazily so ``import kitsseg`` and ``kitsseg --help`` are fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.4.0"

__all__ = ["__version__", "segment", "evaluate"]


def __getattr__(name: str) -> Any:
    if name == "segment":
        from .segment import segment

        return segment
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'kitsseg' has no attribute {name!r}")
