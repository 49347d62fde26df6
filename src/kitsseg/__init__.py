"""kitsseg: kidney and kidney-tumor segmentation in abdominal CT.

Two 2D U-Nets on axial slices (kidney+tumor, then tumor only), anatomical and statistical
post-processing, and a labelled NIfTI (0 background, 1 kidney, 2 tumor) with a report of volumes.

The library API is importable from the package itself::

    from kitsseg import segment, segment_folder, load_model, evaluate, train, PostprocessOptions

Heavy modules (torch, nibabel) are imported lazily, on first use of a name, so ``import kitsseg`` and
``kitsseg --help`` stay fast. Three of the names are also the names of the modules that define them
(``segment``, ``evaluate``, ``train``). Python's import system binds a submodule to the package attribute
of the same name when it is first imported (``import kitsseg.segment`` would make ``kitsseg.segment``
the module); the package refuses that binding for the names below, so the attribute is the function or
class whatever was imported first. Reach such a module with ``from kitsseg.segment import ...`` or
``importlib.import_module("kitsseg.segment")`` (``import kitsseg.segment as m`` gives the function).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

#: Public name -> the module (inside the package) that defines it.
_EXPORTS: dict[str, str] = {
    "segment": "segment",
    "segment_folder": "segment",
    "load_model": "segment",
    "LoadedModel": "segment",
    "SegmentationResult": "segment",
    "BatchResult": "segment",
    "CaseOutcome": "segment",
    "evaluate": "evaluate",
    "EvaluationResult": "evaluate",
    "train": "train",
    "TrainConfig": "train",
    "TrainResult": "train",
    "PostprocessOptions": "postprocess",
    "tune_process": "device",
    "example_ct_path": "example",
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
    from .device import tune_process
    from .errors import KitssegError, KitssegWarning
    from .evaluate import EvaluationResult, evaluate
    from .example import example_ct_path
    from .postprocess import PostprocessOptions
    from .segment import (
        BatchResult,
        CaseOutcome,
        LoadedModel,
        SegmentationResult,
        load_model,
        segment,
        segment_folder,
    )
    from .train import TrainConfig, TrainResult, train


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use, and keep the object for later look-ups."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on; the import system cannot replace it either
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The package's module type: a submodule import does not overwrite a public name (see above)."""

    def __setattr__(self, name: str, value: Any) -> None:
        submodule = isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"
        if submodule and name in _EXPORTS:
            return  # the submodule stays in sys.modules; the attribute stays (or becomes) the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
