"""The library API is importable from ``kitsseg`` as functions and classes, whatever was imported first.

``segment``, ``evaluate`` and ``train`` are public functions; the modules that define them live in
subpackages (``kitsseg.inference.segment``, ``kitsseg.evaluation.evaluate``, ``kitsseg.training.train``),
so importing a module never binds a module over a public name. Each order is checked in a fresh
interpreter, because the import system binds submodules only on their first import.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types

import pytest

import kitsseg

#: Public functions whose names were once modules of the package (and are module names in subpackages).
SHADOWED = ("segment", "evaluate", "train")
#: The modules that define them, and the other subpackage modules behind the public names.
DEFINING = (
    "kitsseg.inference.segment",
    "kitsseg.inference.batch",
    "kitsseg.evaluation.evaluate",
    "kitsseg.training.train",
    "kitsseg.postprocess.pipeline",
    "kitsseg.nets.device",
)

_REPORT = """
import json, sys, types
import kitsseg
print(json.dumps({
    name: type(getattr(kitsseg, name)).__name__ for name in kitsseg.__all__ if name != "__version__"
}))
print(json.dumps(sorted(m for m in ("torch", "nibabel") if m in sys.modules)))
"""


def _fresh(code: str) -> list[object]:
    """Run ``code`` in a new interpreter and parse each line it prints as JSON."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines()]


def _public_kinds(kinds: object) -> None:
    assert isinstance(kinds, dict)
    assert set(kinds) == set(kitsseg.__all__) - {"__version__"}
    assert "module" not in kinds.values(), kinds
    for name in SHADOWED:
        assert kinds[name] == "function", name


def test_functions_after_importing_the_submodules_first() -> None:
    prelude = f"import {', '.join(DEFINING)}\n"
    kinds, _ = _fresh(prelude + _REPORT)
    _public_kinds(kinds)


def test_importing_the_submodules_later_does_not_rebind_the_names() -> None:
    code = (
        "from kitsseg import segment, evaluate, train\n"
        f"import {', '.join(DEFINING)}\n"
        "import importlib\n"
        "importlib.import_module('kitsseg.inference.segment')\n"
        "from kitsseg import segment as again\n"
        "assert again is segment is kitsseg.segment, (again, segment)\n"
    ) + _REPORT
    kinds, _ = _fresh(code)
    _public_kinds(kinds)


def test_import_kitsseg_stays_light() -> None:
    """``import kitsseg`` (and so ``kitsseg --help``) loads neither torch nor nibabel."""
    code = "import json, sys, kitsseg\nprint(json.dumps(sorted({'torch', 'nibabel'} & set(sys.modules))))"
    assert _fresh(code) == [[]]


def test_exports_in_this_process_are_the_defining_objects() -> None:
    from kitsseg.inference.batch import segment_folder
    from kitsseg.inference.segment import SegmentationResult
    from kitsseg.postprocess.pipeline import PostprocessOptions

    seg = importlib.import_module("kitsseg.inference.segment")
    assert isinstance(seg, types.ModuleType)
    assert kitsseg.segment is seg.segment
    assert kitsseg.segment_folder is segment_folder
    assert kitsseg.SegmentationResult is SegmentationResult
    assert kitsseg.PostprocessOptions is PostprocessOptions
    assert kitsseg.evaluate is importlib.import_module("kitsseg.evaluation.evaluate").evaluate
    assert kitsseg.train is importlib.import_module("kitsseg.training.train").train
    assert callable(kitsseg.tune_process)
    assert issubclass(kitsseg.KitssegError, Exception)
    for name, module in kitsseg._EXPORTS.items():  # the table names the defining module, not a re-export
        assert getattr(kitsseg, name).__module__ == f"kitsseg.{module}", name


def test_all_dir_and_unknown_names() -> None:
    assert kitsseg.__all__ == ["__version__", *kitsseg._EXPORTS]  # the literal list and the table agree
    assert set(kitsseg.__all__) <= set(dir(kitsseg))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kitsseg.nope  # noqa: B018
    # Subpackages are bound as usual.
    io = importlib.import_module("kitsseg.io")
    assert kitsseg.io is io
