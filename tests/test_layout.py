"""The package layout holds: small modules, imports that only run downwards, the CLI on top of the library.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and line. The order
below is the one ``docs/architecture.md`` ("Modules") explains; a module may import modules of its own
subpackage and of the subpackages before it, never after.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import kitsseg

SRC = Path(kitsseg.__file__).resolve().parent

#: The layers, lowest first. "foundation" is the leaf modules at the top of the package (errors, env,
#: names, arrays, _version); "api" is the package's ``__init__`` and ``__main__``.
LAYERS = (
    "foundation",
    "io",
    "nets",
    "weights",
    "postprocess",
    "evaluation",
    "reporting",
    "inference",
    "training",
    "cli",
    "api",
)
MAX_LINES = 600


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "kitsseg.io.load"
    target: str  # the imported kitsseg module, e.g. "kitsseg.io.frame"
    names: tuple[str, ...]  # the names taken from it (empty for ``import kitsseg.x``)
    line: int

    def where(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> list[Import]:
    """Every import of a kitsseg module in ``module``, at any depth (lazy and TYPE_CHECKING ones too)."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "kitsseg"]
            found += [Import(module, name, (), node.lineno) for name in names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "kitsseg":
                target = node.module or ""
            else:
                continue
            names = tuple(a.name for a in node.names)
            # ``from . import env``: the submodules are what is imported
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            if subs and len(subs) == len(names):
                found += [Import(module, f"{target}.{n}", (), node.lineno) for n in subs]
            else:
                found.append(Import(module, target, names, node.lineno))
    return found


ALL_IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "api"
    if len(parts) == 2 and not _is_package(module):
        return "foundation"
    return parts[1]


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = sorted({module for module in MODULES if layer(module) not in LAYERS})
    assert not unknown, f"add these to LAYERS (and docs/architecture.md) or move them: {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_at_most_600_lines(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concept"


def test_imports_only_run_downwards() -> None:
    upward = [
        imp.where() + f" ({layer(imp.module)} may not import {layer(imp.target)})"
        for imp in ALL_IMPORTS
        if LAYERS.index(layer(imp.target)) > LAYERS.index(layer(imp.module))
    ]
    assert not upward, "\n".join(upward)


def test_foundation_modules_import_only_each_other() -> None:
    """errors, env, names, arrays, _version: leaves every layer may use, so they depend on nothing."""
    bad = [
        imp.where()
        for imp in ALL_IMPORTS
        if layer(imp.module) == "foundation" and layer(imp.target) != "foundation"
    ]
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_the_cli() -> None:
    """The library works without the CLI; only the entry point (``__main__``) starts it."""
    bad = [
        imp.where()
        for imp in ALL_IMPORTS
        if layer(imp.target) == "cli" and layer(imp.module) != "cli" and imp.module != "kitsseg.__main__"
    ]
    assert not bad, "\n".join(bad)


def test_private_names_stay_inside_their_subpackage() -> None:
    """A split module's siblings may share ``_helpers``; another subpackage uses only public names."""
    bad = [
        f"{imp.where()}: {name}"
        for imp in ALL_IMPORTS
        for name in imp.names
        if name.startswith("_")
        and not name.startswith("__")
        and imp.module.rpartition(".")[0] != imp.target.rpartition(".")[0]
    ]
    assert not bad, "\n".join(bad)


def test_every_import_names_a_module_and_names_that_exist() -> None:
    """Lazy imports inside functions run only when called: check here that each resolves after the move."""
    missing = []
    for imp in ALL_IMPORTS:
        if imp.target not in MODULES:
            missing.append(f"{imp.where()}: no such module")
            continue
        tree = ast.parse(MODULES[imp.target].read_text(encoding="utf-8"))
        bound = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.If, ast.Try)):
                stores = [n for n in ast.walk(node) if isinstance(n, ast.Name) and type(n.ctx) is ast.Store]
                bound |= {n.id for n in stores}
                bound |= {
                    (a.asname or a.name).split(".")[0]
                    for n in ast.walk(node)
                    if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names
                }
        if imp.target == "kitsseg":
            bound |= set(kitsseg._EXPORTS)
        for name in imp.names:
            if name != "*" and name not in bound and f"{imp.target}.{name}" not in MODULES:
                missing.append(f"{imp.where()}: it has no {name!r}")
    assert not missing, "\n".join(missing)


def test_the_layout_test_sees_the_imports() -> None:
    """The checks above are not vacuous: lazy, relative and TYPE_CHECKING imports are all found."""
    pairs = {(imp.module, imp.target) for imp in ALL_IMPORTS}
    assert ("kitsseg.io.load", "kitsseg.io.frame") in pairs  # relative, top level
    assert ("kitsseg.io.load", "kitsseg.io.niftistream") in pairs  # inside a function
    assert ("kitsseg.nets.allocator", "kitsseg.env") in pairs  # ``from .. import env``
    assert ("kitsseg.__main__", "kitsseg.cli") in pairs
    assert any(t.startswith("kitsseg.weights") for m, t in pairs if m == "kitsseg.inference.segment")
    assert layer("kitsseg.errors") == "foundation"
    assert layer("kitsseg") == "api"
    assert layer("kitsseg.io.frame") == "io"
