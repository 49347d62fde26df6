"""Named, verified weights: the registry, resolution of a name / path / URL to a file, import, verify, load.

The registry is data (``kitsseg/assets/registry.json``): one entry per published weights file with its
name, version, download URLs, file name, sha256, size, whether it ships inside the package, a short model
description, HU window, tumor eigenvalue-ratio bounds, training data and licence. Every file is checked
against its sha256 before use, shipped ones included (once per process), and a file that fails is reported
with :class:`~kitsseg.errors.ChecksumError`, never used.

Resolution order for a name: the copy shipped in the package, then the cache (:mod:`kitsseg.cache`), then a
download (:mod:`kitsseg.download`) unless offline. Weights that are not in the registry (files imported on
an offline machine, bare URLs) are remembered in a small index inside the cache, with the sha256 they had
when they arrived, so they are verified the same way afterwards.

Nothing here reads the disk at import; ``KITSSEG_REGISTRY`` points at another registry file (private
deployments and tests), whose shipped files then live beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

from . import env
from .atomic import atomic_output
from .cache import (
    OFFLINE_ENV,
    cache_root,
    cache_write_errors,
    check_root_is_folder,
    ensure_writable_root,
    file_lock,
    is_offline,
    lock_path,
    read_index,
    record_in_index,
)
from .download import DownloadPolicy, download, partial_path, sha256_file
from .errors import ChecksumError, InputNotFoundError, WeightsError

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from .checkpoint import WeightsBundle

#: Environment variable naming a registry file to use instead of the packaged one.
REGISTRY_ENV = env.REGISTRY
PACKAGE_ASSETS = Path(__file__).resolve().parent / "assets"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WeightsEntry:
    """One registered weights file. ``origin`` is ``"registry"`` or ``"local"`` (the cache's own index)."""

    name: str
    file: str
    sha256: str | None
    version: str = ""
    urls: tuple[str, ...] = ()
    size: int | None = None
    shipped: bool = False
    model: str = ""
    hu_window: tuple[float, float] | None = None
    eig_bounds: tuple[float, float] | None = None
    training_data: str = ""
    license: str = ""
    default: bool = False
    origin: str = "registry"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "registry") -> WeightsEntry:
        """Build and validate an entry; errors name the registry and the entry."""
        if not isinstance(data, dict):
            raise WeightsError(f"{where}: every entry must be a JSON object, got {type(data).__name__}")
        label = f"{where}: entry {data.get('name')!r}"
        name, file = data.get("name"), data.get("file")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise WeightsError(f"{label}: 'name' must be letters, digits, '.', '_' or '-'")
        if not isinstance(file, str) or not _NAME_RE.fullmatch(file):
            raise WeightsError(f"{label}: 'file' must be a plain file name (no folders)")
        sha = data.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA_RE.fullmatch(sha.lower())):
            raise WeightsError(f"{label}: 'sha256' must be 64 hex digits (or null while unknown)")
        urls = data.get("urls", [])
        if isinstance(urls, str):
            urls = [urls]
        if not all(isinstance(u, str) and _is_url(u) for u in urls):
            raise WeightsError(f"{label}: 'urls' must be a list of http(s) URLs")

        def pair(key: str) -> tuple[float, float] | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise WeightsError(f"{label}: {key!r} must be [lo, hi]")
            return float(value[0]), float(value[1])

        size = data.get("size")
        return cls(
            name=name,
            file=file,
            sha256=sha.lower() if sha else None,
            version=str(data.get("version", "")),
            urls=tuple(urls),
            size=int(size) if size is not None else None,
            shipped=bool(data.get("shipped", False)),
            model=str(data.get("model", "")),
            hu_window=pair("hu_window"),
            eig_bounds=pair("eig_bounds"),
            training_data=str(data.get("training_data", "")),
            license=str(data.get("license", "")),
            default=bool(data.get("default", False)),
            origin=str(data.get("origin", "registry")),
        )


class Registry:
    """The known weights, and the folder their shipped files live in."""

    def __init__(
        self, entries: list[WeightsEntry], assets_dir: Path = PACKAGE_ASSETS, source: str = ""
    ) -> None:
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        where = source or "registry"
        if dupes:
            raise WeightsError(f"{where}: duplicate weights names {dupes}")
        if sum(e.default for e in entries) > 1:
            raise WeightsError(f"{where}: more than one entry is marked default")
        self.entries = list(entries)
        self.assets_dir = Path(assets_dir)
        self.source = where

    @classmethod
    def from_entries(
        cls, entries: list[dict[str, Any] | WeightsEntry], assets_dir: str | os.PathLike[str] | None = None
    ) -> Registry:
        """A registry from dicts (as in the JSON) or entries; shipped files live in ``assets_dir``."""
        built = [e if isinstance(e, WeightsEntry) else WeightsEntry.from_dict(e) for e in entries]
        return cls(built, Path(assets_dir) if assets_dir is not None else PACKAGE_ASSETS)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Registry:
        """Read a registry JSON file (a list of entries); its shipped files live in the same folder."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise WeightsError(f"weights registry {path} does not exist (check ${REGISTRY_ENV})") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(f"weights registry {path} cannot be read: {exc}") from exc
        if not isinstance(data, list):
            raise WeightsError(f"weights registry {path} must hold a JSON list of entries")
        return cls([WeightsEntry.from_dict(d, str(path)) for d in data], path.parent, str(path))

    def find(self, name: str) -> WeightsEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def by_sha256(self, sha: str) -> WeightsEntry | None:
        return next((e for e in self.entries if e.sha256 == sha), None)

    def by_url(self, url: str) -> WeightsEntry | None:
        return next((e for e in self.entries if url in e.urls), None)

    def by_file(self, file: str) -> WeightsEntry | None:
        return next((e for e in self.entries if e.file == file), None)

    def default(self) -> WeightsEntry:
        """The entry marked ``default`` (else the first one)."""
        if not self.entries:
            raise WeightsError(f"{self.source} lists no weights; pass --weights PATH")
        return next((e for e in self.entries if e.default), self.entries[0])

    def shipped_path(self, entry: WeightsEntry) -> Path:
        return self.assets_dir / entry.file


def default_registry() -> Registry:
    """The registry in use: ``$KITSSEG_REGISTRY`` if set, else the one inside the package."""
    custom = env.registry()
    return Registry.load(custom if custom is not None else PACKAGE_ASSETS / "registry.json")


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


# -- import, list, verify ------------------------------------------------------------------------------


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


# -- helpers -------------------------------------------------------------------------------------------

_REINSTALL = "reinstall kitsseg (pip install --force-reinstall kitsseg)"


def _check(path: Path, expected: str, what: str, fix: str) -> None:
    actual = weights_sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{what} does not match its sha256: expected {expected} but got {actual}; it was not used. {fix}"
        )


def _copy_verified(src: Path, dest: Path, sha: str) -> None:
    """Copy under the target's lock into a temporary file beside it, re-check the hash, rename into place.

    The source must not be the cached file itself (or a link to it): that is an output on its input.
    """
    from .guard import refuse_outputs_on_inputs

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


def _local_entry(name: str, record: dict[str, Any]) -> WeightsEntry:
    source = str(record.get("source", ""))
    return WeightsEntry.from_dict(
        {
            "name": name,
            "file": record.get("file"),
            "sha256": record.get("sha256"),
            "version": record.get("version", ""),
            "urls": [source] if _is_url(source) else [],
            "size": record.get("size"),
            "model": record.get("model", ""),
            "hu_window": record.get("hu_window"),
            "eig_bounds": record.get("eig_bounds"),
            "training_data": record.get("training_data", ""),
            "license": record.get("license", ""),
            "origin": "local",
        },
        "local index",
    )


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _normalise_sha(sha: str | None) -> str | None:
    if sha is None:
        return None
    value = sha.strip().lower()
    if not _SHA_RE.fullmatch(value):
        raise WeightsError(f"--sha256 {sha!r} is not 64 hex digits")
    return value
