"""Atomic file output: write beside the target, then rename it into place.

Every file kitsseg writes (masks, reports, weights, checkpoints, indexes, previews) must either appear
complete or not at all, so an interrupted run, a full disk or Ctrl-C never leaves half a file under a real
name. The recipe is the one POSIX guarantees: a temporary file in the *destination folder* (a rename is
only atomic within one file system), written and flushed to disk, then ``os.replace`` over the target;
on any failure the temporary is removed and the old target, if any, is untouched.

The temporary is hidden (``.<name>.<random>.tmp``) so folder scans (``io.inputs.find_nifti``) skip it, and
can keep a suffix a writer relies on (``nibabel`` picks gzip from ``.nii.gz``). ``tempfile.mkstemp``
creates it with mode ``0o600``; the finished file gets what a plain ``open()`` would give, ``0o666`` minus
the umask, so a shared weights file or results folder stays readable.

Callers keep their own error translation (``OSError`` -> :class:`~kitsseg.errors.OutputError` with their
message): this module raises the ``OSError`` of the step that failed, e.g. ``FileNotFoundError`` when the
destination folder does not exist (it never creates folders; some callers must refuse a missing one).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_output",
    "current_umask",
    "default_file_mode",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_user_output",
]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, which for a moment changes the mode of files other threads
    create; Linux reports it in ``/proc/self/status`` instead. Elsewhere it is read by setting ``0o077``
    (never looser than any real umask) under a lock.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666`` minus the umask: what ``open()`` would give (``mkstemp`` always makes ``0o600``)."""
    return 0o666 & ~current_umask()


def _fsync_path(path: Path) -> None:
    """Flush a written regular file to disk (a writer that only got a path cannot do it itself)."""
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit move the written file into place.

    ``suffix`` (e.g. ``".nii.gz"``, ``".png"``) ends the temporary name for writers that choose the format
    from it; a target name ending in the same suffix drops it from the hidden stem. On clean exit the file
    is fsynced (when it is a regular file; every output, masks included), given :func:`default_file_mode`
    and renamed over ``path`` with ``os.replace``. On any exception, ``KeyboardInterrupt`` included, the
    temporary is removed and the exception re-raised; ``path`` is then left exactly as it was.

    Raises the underlying ``OSError`` (``FileNotFoundError`` when the folder of ``path`` does not exist).
    """
    path = Path(path)
    stem = path.name
    if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
        stem = stem[: -len(suffix)]
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix or ''}", dir=path.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`); returns ``path``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", newline: str | None = None
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`); returns ``path``.

    ``newline`` is passed to ``open``: ``""`` writes line endings exactly as they are in ``text`` (CSV).
    """
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", encoding=encoding, newline=newline) as fh:
        fh.write(text)
    return path


def write_user_output(path: str | os.PathLike[str], text: str, subject: str) -> Path:
    """Write a user-facing output file atomically; an ``OSError`` becomes one clear ``OutputError``.

    ``subject`` names the file in the message ("the report /x/a.json"). A failure before the temporary file
    exists is the folder's fault, so the message then also says to choose a writable folder.
    """
    from ..errors import OutputError

    path = Path(path)
    started = False
    try:
        with atomic_output(path) as tmp:
            started = True
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        hint = "" if started else "; choose a writable folder"
        raise OutputError(f"cannot write {subject}: {exc.strerror or exc}{hint}") from exc
    return path


def write_json_output(path: str | os.PathLike[str], data: Any, subject: str) -> Path:
    """Write ``data`` as indented JSON with :func:`write_user_output` (the one JSON writer of user outputs).

    ``allow_nan=False``: JSON has no NaN or infinity, so a value that slipped through unconverted is an
    error here rather than a file other tools cannot read (callers turn them into ``null`` first).
    """
    return write_user_output(path, json.dumps(data, indent=2, allow_nan=False) + "\n", subject)
