"""The library API is importable from ``kitsseg`` as functions and classes, whatever was imported first.

``segment``, ``evaluate`` and ``train`` are also module names, and Python's import system binds a freshly
imported submodule to the package attribute of the same name. Each order is checked in a fresh
interpreter, because the binding happens only on a module's first import.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types

import pytest

import kitsseg

#: Names that are also modules of the package: the ones the import system would overwrite.
SHADOWED = ("segment", "evaluate", "train")

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
    prelude = "import kitsseg.segment, kitsseg.evaluate, kitsseg.train, kitsseg.postprocess, kitsseg.device\n"
    kinds, _ = _fresh(prelude + _REPORT)
    _public_kinds(kinds)


def test_importing_the_submodules_later_does_not_rebind_the_names() -> None:
    code = (
        "from kitsseg import segment, evaluate, train\n"
        "import kitsseg.segment, kitsseg.evaluate, kitsseg.train\n"
        "import importlib\n"
        "importlib.import_module('kitsseg.segment')\n"
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
    from kitsseg.postprocess import PostprocessOptions
    from kitsseg.segment import SegmentationResult, segment_folder

    seg = importlib.import_module("kitsseg.segment")
    assert isinstance(seg, types.ModuleType)
    assert kitsseg.segment is seg.segment
    assert kitsseg.segment_folder is segment_folder
    assert kitsseg.SegmentationResult is SegmentationResult
    assert kitsseg.PostprocessOptions is PostprocessOptions
    assert kitsseg.evaluate is importlib.import_module("kitsseg.evaluate").evaluate
    assert kitsseg.train is importlib.import_module("kitsseg.train").train
    assert callable(kitsseg.tune_process)
    assert issubclass(kitsseg.KitssegError, Exception)


def test_all_dir_and_unknown_names() -> None:
    assert kitsseg.__all__ == ["__version__", *kitsseg._EXPORTS]  # the literal list and the table agree
    assert set(kitsseg.__all__) <= set(dir(kitsseg))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kitsseg.nope  # noqa: B018
    # Other submodules are bound as usual.
    volume = importlib.import_module("kitsseg.volume")
    assert kitsseg.volume is volume
