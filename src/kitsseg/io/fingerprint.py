"""Which input a result was made from: size, modification time and sha256 of the file, kept in the report.

``segment --continue`` skips a case whose mask and report already exist. Without a record of the input,
a mask made from another CT of the same shape (a folder refilled with new cases, a file replaced in
place) passes every check and is kept. The report therefore records the input's fingerprint, and a case
counts as finished only when the input on disk still has that size and sha256. The whole file is hashed:
about 0.2 s per 100 MB, small next to segmenting it, and nothing short of the full contents (header and
voxels) tells two inputs apart for sure. ``mtime_ns`` is recorded for people reading the report but not
compared: a folder copied elsewhere (new times, same bytes) still counts as finished.

An input that is a folder (a DICOM series) is fingerprinted by the names, sizes and sha256 of the files in
it (sorted), so adding, removing or changing one slice changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FINGERPRINT_KEY", "fingerprint_matches", "input_fingerprint", "sha256_file"]

#: Key of the fingerprint in the per-case report.
FINGERPRINT_KEY = "input_fingerprint"


def input_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size", "mtime_ns", "sha256"}`` of a file (its target, when ``path`` is a symlink) or a folder."""
    path = Path(path)
    st = path.stat()
    return {"size": _size(path), "mtime_ns": int(st.st_mtime_ns), "sha256": _digest(path)}


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks (inputs and weights files can be hundreds of MB;
    the weights' checks in :mod:`kitsseg.weights` use it too)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(int(p.stat().st_size) for p in _files(path))
    return int(path.stat().st_size)


def _digest(path: Path) -> str:
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for p in _files(path):
        digest.update(f"{p.name}\0{p.stat().st_size}\0{sha256_file(p)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def fingerprint_matches(recorded: object, path: str | os.PathLike[str]) -> bool:
    """Whether ``recorded`` (a report's fingerprint) describes the file at ``path`` now.

    A missing or malformed record never matches. The size is compared first, so a different file of
    another size costs no hashing.
    """
    if not isinstance(recorded, Mapping):
        return False
    size, digest = recorded.get("size"), recorded.get("sha256")
    if not isinstance(size, int) or not isinstance(digest, str):
        return False
    try:
        if _size(Path(path)) != size:
            return False
        return _digest(Path(path)) == digest
    except OSError:
        return False
