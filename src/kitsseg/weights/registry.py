"""The weights registry: which named weights exist, their files, hashes and URLs (data, not code).

The registry is data (``kitsseg/assets/registry.json``): one entry per published weights file with its
name, version, download URLs, file name, sha256, size, whether it ships inside the package, a short model
description, HU window, tumor eigenvalue-ratio bounds, training data and licence. Nothing here reads the
disk at import; ``KITSSEG_REGISTRY`` points at another registry file (private deployments and tests),
whose shipped files then live beside it. Resolving a name to a verified file is :mod:`.resolve`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import env
from ..errors import WeightsError

#: Environment variable naming a registry file to use instead of the packaged one.
REGISTRY_ENV = env.REGISTRY
#: The package's own assets folder (shipped weights, the registry, the example CT).
PACKAGE_ASSETS = Path(__file__).resolve().parent.parent / "assets"

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
