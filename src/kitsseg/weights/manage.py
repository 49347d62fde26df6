"""Managing the local weights: import a file (machines without network), list, verify.

The commands of ``kitsseg weights`` (``import``, ``list``, ``verify``) are these functions; resolving and
downloading is :mod:`.resolve`. Nothing here deletes a file: ``verify`` only reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from ..errors import ChecksumError, InputNotFoundError, WeightsError
from ..io.atomic import atomic_output
from ..io.fingerprint import sha256_file
from .cache import (
    cache_root,
    cache_write_errors,
    check_root_is_folder,
    ensure_writable_root,
    file_lock,
    lock_path,
    read_index,
    record_in_index,
)
from .download import partial_path
from .registry import _NAME_RE, Registry, WeightsEntry, _local_entry, default_registry
from .resolve import _REINSTALL, _describe_file, weights_sha256


class WeightsStatus(NamedTuple):
    """A row of :func:`list_weights`. ``state``: ``"shipped"``, ``"cached"``, ``"not cached"`` or
    ``"missing"`` (a shipped file absent from the package)."""

    entry: WeightsEntry
    cached: bool
    path: Path
    state: str


class VerifyResult(NamedTuple):
    """A row of :func:`verify_cache`."""

    name: str
    ok: bool
    message: str



def import_weights(
    file: str | os.PathLike[str],
    name: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
) -> Path:
    """Copy a weights file into the cache (for machines without network) and return its cached path.

    A file whose sha256 is a registry entry's (or ``name`` is a registry name and the hash matches) takes
    that entry's place; any other file must load as a kitsseg weights bundle and is recorded under
    ``name`` (default: the file's stem) in the cache's index with its sha256. The source is never modified.
    """
    src = Path(file).expanduser()
    if not src.is_file():
        raise InputNotFoundError(f"weights file {src} does not exist or is not a file")
    reg = registry if registry is not None else default_registry()
    root = cache_root(cache_dir)
    check_root_is_folder(root)
    actual = weights_sha256(src, fresh=True)
    entry = reg.find(name) if name else (reg.by_sha256(actual) or reg.by_file(src.name))
    if entry is not None:
        if entry.sha256 is None:
            raise WeightsError(
                f"registry entry {entry.name!r} has no sha256 yet; import under another --name"
            )
        if actual != entry.sha256:
            raise ChecksumError(
                f"{src} is not the registered {entry.name!r}: expected sha256 {entry.sha256} but got "
                f"{actual}; nothing was imported"
            )
        dest = root / entry.file
        _copy_verified(src, dest, actual)
        return dest
    name = name or src.stem
    if not _NAME_RE.fullmatch(name):
        raise WeightsError(f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    described = _describe_file(src)  # also proves the file loads as kitsseg weights
    suffix = src.suffix if src.suffix in (".pt", ".pth") else ".pt"
    dest = root / f"{name}{suffix}"
    if reg.by_file(dest.name) is not None:
        raise WeightsError(f"{dest.name} is the file of a registered entry; choose another --name")
    _copy_verified(src, dest, actual)
    record_in_index(
        root, name, {**described, "file": dest.name, "sha256": actual, "source": f"import:{src.resolve()}"}
    )
    return dest


def list_weights(
    cache_dir: str | os.PathLike[str] | None = None, *, registry: Registry | None = None
) -> list[WeightsStatus]:
    """Every registered and locally indexed weights file, where it is, and whether it is available offline.

    Nothing is hashed here (``verify`` does that), so listing is instant.
    """
    reg = registry if registry is not None else default_registry()
    root = cache_root(cache_dir)
    rows: list[WeightsStatus] = []
    for entry in reg.entries:
        shipped = reg.shipped_path(entry)
        if entry.shipped and shipped.is_file():
            rows.append(WeightsStatus(entry, True, shipped, "shipped"))
            continue
        if entry.shipped and not entry.urls:  # a broken install: verify and resolve say "reinstall"
            rows.append(WeightsStatus(entry, False, shipped, "missing"))
            continue
        dest = root / entry.file
        rows.append(WeightsStatus(entry, dest.is_file(), dest, "cached" if dest.is_file() else "not cached"))
    for name, record in sorted(read_index(root).items()):
        entry = _local_entry(name, record)
        dest = root / entry.file
        rows.append(WeightsStatus(entry, dest.is_file(), dest, "cached" if dest.is_file() else "not cached"))
    return rows


def verify_cache(
    cache_dir: str | os.PathLike[str] | None = None, *, registry: Registry | None = None
) -> list[VerifyResult]:
    """Re-hash every shipped and cached weights file and report; nothing is deleted or changed.

    Unfinished downloads (``.partial``) are listed as such; loading refuses mismatching files anyway.
    """
    reg = registry if registry is not None else default_registry()
    root = cache_root(cache_dir)
    results: list[VerifyResult] = []

    def check(name: str, path: Path, expected: str | None, what: str, fix: str) -> None:
        if expected is None:
            results.append(VerifyResult(name, False, f"{what}: the registry has no sha256 for it"))
            return
        actual = weights_sha256(path, fresh=True)
        if actual == expected:
            results.append(VerifyResult(name, True, f"{what}: sha256 ok"))
        else:
            results.append(
                VerifyResult(name, False, f"{what}: expected sha256 {expected} but got {actual}; {fix}")
            )

    for entry in reg.entries:
        shipped = reg.shipped_path(entry)
        if entry.shipped:
            if shipped.is_file():
                check(entry.name, shipped, entry.sha256, f"shipped {shipped}", _REINSTALL)
            elif not entry.urls:
                results.append(
                    VerifyResult(entry.name, False, f"shipped file {shipped} is missing; {_REINSTALL}")
                )
        dest = root / entry.file
        if dest.is_file():
            check(
                entry.name, dest, entry.sha256, f"cached {dest}", f"run `kitsseg weights pull {entry.name}`"
            )
    for name, record in sorted(read_index(root).items()):
        dest = root / str(record.get("file", ""))
        fix = f"run `kitsseg weights pull {name}` or import it again"
        if dest.is_file():
            check(name, dest, record.get("sha256"), f"cached {dest}", fix)
        else:
            results.append(VerifyResult(name, False, f"{dest} is missing; {fix}"))
    if root.is_dir():
        for part in sorted(root.glob("*.partial")):
            results.append(
                VerifyResult(
                    part.name[: -len(".partial")],
                    True,
                    f"unfinished download {part} ({part.stat().st_size} bytes); "
                    "`kitsseg weights pull` resumes it",
                )
            )
    return results


def _copy_verified(src: Path, dest: Path, sha: str) -> None:
    """Copy under the target's lock into a temporary file beside it, re-check the hash, rename into place.

    The source must not be the cached file itself (or a link to it): that is an output on its input.
    """
    from ..io.guard import refuse_outputs_on_inputs

    refuse_outputs_on_inputs(
        [("the cached weights file", dest)],
        [("weights file being imported", src)],
        hint="it is in the cache already, so there is nothing to import",
    )
    ensure_writable_root(dest.parent)
    with cache_write_errors(dest.parent), file_lock(lock_path(dest)):
        with atomic_output(dest) as tmp:
            shutil.copyfile(src, tmp)
            actual = sha256_file(tmp)
            if actual != sha:
                raise ChecksumError(
                    f"{src} changed while it was copied (sha256 {actual}, expected {sha}); try again"
                )
        with contextlib.suppress(FileNotFoundError):
            partial_path(dest).unlink()  # an unfinished download of the same file is now moot
