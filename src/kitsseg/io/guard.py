"""Outputs never land on inputs: one test of "is this output path one of the files this command reads".

Every command writes somewhere the user chose (``segment -o``, ``evaluate -o``, ``stats -o``, ``train -o``,
the weights cache), and a path can reach an input in more ways than being spelled the same: a symlink to
it, a hard link (another name for the same inode), a folder symlink on the way, ``..``. kitsseg writes
by renaming a new file over the path, so an output spelled like an input replaces that input, and one
that links to an input replaces the link the user made to it; neither can be what was meant, so such an
output is refused before any work starts.

Two paths are the same file when both exist and ``os.stat`` gives the same ``(st_dev, st_ino)``
(symlinks followed, hard links included); otherwise their fully resolved paths are compared (an output
that does not exist yet, inside a symlinked folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputError

__all__ = ["refuse_outputs_on_inputs", "same_file"]


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode when both exist, else the same resolved path."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        pass
    else:
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop: it cannot be an input either
        return False


def refuse_outputs_on_inputs(
    outputs: Iterable[tuple[str, str | os.PathLike[str]]],
    inputs: Iterable[tuple[str, str | os.PathLike[str]]],
    *,
    hint: str = "choose another output path",
) -> None:
    """Raise :class:`OutputError` when an output path is, or links to, one of the inputs.

    ``outputs`` and ``inputs`` are ``(kind, path)`` pairs; the kinds name them in the message ("the
    output", "the label file"); ``hint`` is the advice at the end. Checked before any work.
    """
    ins = [(kind, Path(p)) for kind, p in inputs]
    for out_kind, out in outputs:
        for in_kind, src in ins:
            if same_file(out, src):
                link = "" if str(Path(out)) == str(src) else f" (it is, or links to, {src})"
                raise OutputError(
                    f"{out_kind} {out} is the {in_kind}{link}; inputs are never overwritten: {hint}"
                )
