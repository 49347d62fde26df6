"""kitsseg: kidney and kidney-tumor segmentation in abdominal CT.

Two 2D U-Nets on axial slices (kidney+tumor, then tumor only), anatomical and statistical
post-processing, and a labelled NIfTI (0 background, 1 kidney, 2 tumor) with a report of volumes.

The library API is importable from the package itself::

    from kitsseg import segment, segment_folder, load_model, evaluate, train, PostprocessOptions

Heavy modules (torch, nibabel) are imported lazily, on first use of a name, so ``import kitsseg`` and
``kitsseg --help`` stay fast. The names are defined in the subpackages (``kitsseg.inference.segment``,
``kitsseg.evaluation.evaluate``, ``kitsseg.training.train``, ...; ``docs/architecture.md`` has the
layout), none of which shares a name with a public function, so ``kitsseg.segment`` is always the
function, whatever was imported first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the module (inside the package) that defines it.
_EXPORTS: dict[str, str] = {
    "segment": "inference.segment",
    "segment_folder": "inference.batch",
    "load_model": "inference.segment",
    "LoadedModel": "inference.segment",
    "SegmentationResult": "inference.segment",
    "BatchResult": "inference.batch",
    "CaseOutcome": "inference.batch",
    "evaluate": "evaluation.evaluate",
    "EvaluationResult": "evaluation.evaluate",
    "train": "training.train",
    "TrainConfig": "training.config",
    "TrainResult": "training.train",
    "PostprocessOptions": "postprocess.pipeline",
    "tune_process": "nets.device",
    "example_ct_path": "inference.example",
    "KitssegError": "errors",
    "KitssegWarning": "errors",
}

__all__ = [  # the same names as _EXPORTS (tests/test_public_api.py checks it), spelled out for linters
    "__version__",
    "segment",
    "segment_folder",
    "load_model",
    "LoadedModel",
    "SegmentationResult",
    "BatchResult",
    "CaseOutcome",
    "evaluate",
    "EvaluationResult",
    "train",
    "TrainConfig",
    "TrainResult",
    "PostprocessOptions",
    "tune_process",
    "example_ct_path",
    "KitssegError",
    "KitssegWarning",
]

if TYPE_CHECKING:
    from .errors import KitssegError, KitssegWarning
    from .evaluation.evaluate import EvaluationResult, evaluate
    from .inference.batch import BatchResult, CaseOutcome, segment_folder
    from .inference.example import example_ct_path
    from .inference.segment import LoadedModel, SegmentationResult, load_model, segment
    from .nets.device import tune_process
    from .postprocess.pipeline import PostprocessOptions
    from .training.config import TrainConfig
    from .training.train import TrainResult, train


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use, and keep the object for later look-ups."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
