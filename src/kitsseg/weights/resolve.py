"""Named, verified weights: resolution of a name / path / URL to a local file, and loading it.

Every file is checked against its sha256 before use, shipped ones included (once per process), and a file
that fails is reported with :class:`~kitsseg.errors.ChecksumError`, never used.

Resolution order for a name of the registry (:mod:`.registry`): the copy shipped in the package, then the
cache (:mod:`.cache`), then a download (:mod:`.download`) unless offline. Weights that are not in the
registry (files imported on an offline machine, bare URLs) are remembered in a small index inside the
cache, with the sha256 they had when they arrived, so they are verified the same way afterwards.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ..errors import ChecksumError, WeightsError
from ..io.fingerprint import sha256_file
from .cache import (
    OFFLINE_ENV,
    cache_root,
    check_root_is_folder,
    ensure_writable_root,
    is_offline,
    read_index,
    record_in_index,
)
from .download import DownloadPolicy, download
from .registry import _NAME_RE, Registry, WeightsEntry, _is_url, _normalise_sha, default_registry

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from .checkpoint import WeightsBundle


# -- hashing, cached per process ---------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def weights_sha256(path: str | os.PathLike[str], *, fresh: bool = False) -> str:
    """The sha256 of a file, remembered for the process while its size, mtime and inode stay the same.

    Shipped and cached weights are verified each time they are resolved; the memo keeps a batch of
    hundreds of CTs from hashing the same file hundreds of times. ``fresh`` recomputes (``verify``).
    """
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    with _HASH_LOCK:
        if not fresh and key in _HASHES:
            return _HASHES[key]
    digest = sha256_file(resolved)
    with _HASH_LOCK:
        _HASHES[key] = digest
    return digest


# -- resolution ----------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    registry: Registry
    root: Path
    explicit_root: bool
    offline: bool
    progress: bool | Console
    policy: DownloadPolicy | None
    allow_download: bool = True
    repair: bool = False


def resolve_weights(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    progress: bool | Console = False,
    registry: Registry | None = None,
    sha256: str | None = None,
    policy: DownloadPolicy | None = None,
) -> Path:
    """The verified local file for ``name_or_path``, downloading it if needed and allowed.

    ``None`` is the registry's default; an existing file is returned as is (``load`` checks it is a
    weights bundle); a registry name resolves to the shipped file, the cached file or a download; a name
    from the local index to its imported file; an ``http(s)://`` URL is pulled into the cache.
    ``sha256``, when given, pins the expected hash of whatever is resolved.

    Raises
    ------
    ChecksumError
        The shipped or cached file does not match its sha256 (it is not used; ``pull`` replaces it).
    WeightsError
        Unknown name, missing file offline (the message names the file, the cache path and the import
        command), download failures.
    """
    ctx = _context(registry, cache_dir, offline, progress, policy)
    return _resolve(name_or_path, ctx, _normalise_sha(sha256))


def pull_weights(
    name_or_url: str | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    progress: bool | Console = False,
    registry: Registry | None = None,
    policy: DownloadPolicy | None = None,
) -> Path:
    """Make sure ``name_or_url`` is in the cache and verified; a corrupt cached copy is downloaded again."""
    if name_or_url is not None and not _is_url(str(name_or_url)) and Path(name_or_url).expanduser().is_file():
        raise WeightsError(
            f"{name_or_url} is a local file: use `kitsseg weights import {name_or_url}` instead"
        )
    ctx = _context(registry, cache_dir, offline, progress, policy)
    ctx.repair = True
    return _resolve(name_or_url, ctx, _normalise_sha(sha256))


def cached_weights_path(
    name: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
) -> Path:
    """The verified local file of ``name`` without any download (``kitsseg weights path``)."""
    ctx = _context(registry, cache_dir, True, False, None)
    ctx.allow_download = False
    return _resolve(name, ctx, None)


def load_weights(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> WeightsBundle:
    """Resolve and verify weights (see :func:`resolve_weights` for ``options``), then load them safely."""
    from .checkpoint import load_bundle

    return load_bundle(resolve_weights(name_or_path, **options), device)


def _context(
    registry: Registry | None,
    cache_dir: str | os.PathLike[str] | None,
    offline: bool | None,
    progress: bool | Console,
    policy: DownloadPolicy | None,
) -> _Ctx:
    return _Ctx(
        registry=registry if registry is not None else default_registry(),
        root=cache_root(cache_dir),
        explicit_root=cache_dir is not None,
        offline=is_offline(offline),
        progress=progress,
        policy=policy,
    )


def _resolve(name_or_path: str | os.PathLike[str] | None, ctx: _Ctx, sha: str | None) -> Path:
    if name_or_path is None:
        path = _resolve_entry(ctx.registry.default(), ctx)
    else:
        text = str(name_or_path)
        if _is_url(text):
            path = _resolve_url(text, ctx, sha)
        elif Path(text).expanduser().is_file():
            path = Path(text).expanduser()
        elif (entry := ctx.registry.find(text)) is not None:
            path = _resolve_entry(entry, ctx)
        elif text in (local := read_index(ctx.root)):
            path = _resolve_local(text, local[text], ctx)
        elif os.sep in text or text.endswith((".pt", ".pth")):
            raise WeightsError(f"weights file {text} does not exist")
        else:
            known = ", ".join([e.name for e in ctx.registry.entries] + sorted(local)) or "none"
            raise WeightsError(
                f"unknown weights {text!r}: not a file, a URL, or a known name (known: {known}); "
                "see `kitsseg weights list`"
            )
    if sha is not None:
        _check(path, sha, f"weights file {path}", "check the --sha256 value")
    return path


def _resolve_entry(entry: WeightsEntry, ctx: _Ctx) -> Path:
    if entry.sha256 is None:
        raise WeightsError(
            f"registry entry {entry.name!r} has no sha256 yet, so it cannot be verified and is not used"
        )
    if entry.shipped:
        shipped = ctx.registry.shipped_path(entry)
        if shipped.is_file():
            _check(shipped, entry.sha256, f"the shipped weights {entry.name} ({shipped})", _REINSTALL)
            return shipped
        if not entry.urls:
            raise WeightsError(
                f"the shipped weights {entry.name} are missing from the package ({shipped}); " + _REINSTALL
            )
    dest = ctx.root / entry.file
    if dest.is_file() and _cached_ok(dest, entry.sha256, entry.name, ctx):
        return dest
    _may_download(entry.name, entry.file, dest, entry.urls, ctx)
    if not entry.urls:
        raise WeightsError(
            f"weights {entry.name!r} have no download URL; place the file {entry.file} with "
            f"`{_import_command(entry.name, ctx)}`"
        )
    errors: list[WeightsError] = []
    for url in entry.urls:
        try:
            return download(url, dest, sha256=entry.sha256, progress=ctx.progress, policy=ctx.policy)
        except WeightsError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise WeightsError(f"every URL of {entry.name!r} failed: " + " | ".join(str(e) for e in errors))


def _resolve_local(name: str, record: dict[str, Any], ctx: _Ctx) -> Path:
    source = str(record.get("source", ""))
    if _is_url(source):
        return _resolve_url(source, ctx, None)
    dest = ctx.root / str(record.get("file", ""))
    if not dest.is_file():
        raise WeightsError(
            f"imported weights {name!r} were removed from the cache ({dest}); "
            f"import them again with `{_import_command(name, ctx)}`"
        )
    fix = f"Import them again with `{_import_command(name, ctx)}`"
    _check(dest, str(record.get("sha256")), f"the cached weights file {dest} ({name})", fix)
    return dest


def _resolve_url(url: str, ctx: _Ctx, sha: str | None) -> Path:
    entry = ctx.registry.by_url(url)
    if entry is not None:
        if sha is not None and sha != entry.sha256:
            raise WeightsError(
                f"--sha256 {sha} contradicts the registry's sha256 of {entry.name!r} for {url}"
            )
        return _resolve_entry(entry, ctx)
    index = read_index(ctx.root)
    name, record = next(((n, r) for n, r in index.items() if r.get("source") == url), (None, None))
    expected: str | None  # the download's checksum: None for a new URL without --sha256
    if record is not None and name is not None:
        dest = ctx.root / str(record["file"])
        recorded = str(record.get("sha256"))
        expected = sha or recorded
        if dest.is_file() and (sha is None or sha == recorded) and _cached_ok(dest, expected, name, ctx):
            return dest
    else:
        name, dest = _name_for_url(url, ctx.registry, index, ctx.root)
        expected = sha
    _may_download(name, dest.name, dest, (url,), ctx)

    def loadable(path: Path) -> None:
        from .checkpoint import read_metadata

        try:
            read_metadata(path)
        except WeightsError as exc:
            raise WeightsError(f"{url} is not a kitsseg weights file ({exc}); deleted the download") from exc

    download(url, dest, sha256=expected, progress=ctx.progress, policy=ctx.policy, validate=loadable)
    actual = weights_sha256(dest)
    record_in_index(
        ctx.root, name, {**_describe_file(dest), "file": dest.name, "sha256": actual, "source": url}
    )
    return dest


def _cached_ok(dest: Path, expected: str, name: str, ctx: _Ctx) -> bool:
    """True if the cached file verifies; a mismatch raises, unless this is a pull (then re-download)."""
    actual = weights_sha256(dest)
    if actual == expected:
        return True
    if ctx.repair and ctx.allow_download and not ctx.offline:
        return False
    raise ChecksumError(
        f"the cached weights file {dest} ({name}) does not match its sha256: expected {expected} but got "
        f"{actual}; it was not used. Run `kitsseg weights pull {name}` to download it again"
    )


def _may_download(name: str, file: str, dest: Path, urls: tuple[str, ...], ctx: _Ctx) -> None:
    """Refuse to go on when the file is missing and downloading is not allowed, saying how to fix it."""
    check_root_is_folder(ctx.root)  # "place it at KITSSEG_HOME/file" is no advice when that is a file
    if not ctx.allow_download:
        raise WeightsError(
            f"weights {name!r} are not in the cache ({dest}); run `kitsseg weights pull {name}` "
            f"or `{_import_command(name, ctx)}`"
        )
    if ctx.offline:
        origin = f" (download {urls[0]} on a machine with network)" if urls else ""
        raise WeightsError(
            f"weights {name!r} are not cached and offline mode ({OFFLINE_ENV}=1) forbids downloading: "
            f"the file {file} belongs at {dest}. Copy it to this machine{origin} and place it with "
            f"`{_import_command(name, ctx)}`"
        )
    ensure_writable_root(ctx.root)


def _import_command(name: str, ctx: _Ctx) -> str:
    extra = f" --cache-dir {ctx.root}" if ctx.explicit_root else ""
    return f"kitsseg weights import FILE --name {name}{extra}"


def _name_for_url(
    url: str, registry: Registry, index: dict[str, dict[str, Any]], root: Path
) -> tuple[str, Path]:
    """A cache file name and an index name for a URL that is not in the registry, never clobbering others."""
    import hashlib

    tag = hashlib.sha256(url.encode()).hexdigest()[:8]
    base = unquote(Path(urlsplit(url).path).name)
    if not _NAME_RE.fullmatch(base):
        base = f"weights-{tag}.pt"
    taken_files = {e.file for e in registry.entries} | {str(r.get("file")) for r in index.values()}
    file = base if base not in taken_files else f"{tag}-{base}"
    name = Path(file).stem
    if registry.find(name) is not None or name in index:
        name = f"{name}-{tag}"
    return name, root / file


# -- helpers -------------------------------------------------------------------------------------------

_REINSTALL = "reinstall kitsseg (pip install --force-reinstall kitsseg)"


def _check(path: Path, expected: str, what: str, fix: str) -> None:
    actual = weights_sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{what} does not match its sha256: expected {expected} but got {actual}; it was not used. {fix}"
        )


def _describe_file(path: Path) -> dict[str, Any]:
    """Size and provenance for the index, read from the file's own metadata (which must load)."""
    from .checkpoint import read_metadata

    meta = read_metadata(path)
    stages = meta.get("stages", {})
    model = ", ".join(
        f"{stage} w{info.get('config', {}).get('base_width')}/d{info.get('config', {}).get('depth')}"
        for stage, info in stages.items()
        if isinstance(info, dict)
    )
    return {
        "size": path.stat().st_size,
        "version": str(meta.get("version", "")),
        "license": str(meta.get("license", "")),
        "training_data": str(meta.get("training_data", "")),
        "model": model,
        "hu_window": meta.get("hu_window"),
        "eig_bounds": meta.get("eig_bounds"),
    }
