"""Where downloaded weights live, how parallel jobs share that place, and the small index of local weights.

The cache folder is ``platformdirs.user_cache_dir("kitsseg")`` unless the environment variable
``KITSSEG_HOME`` or an explicit argument names another one (a cluster's shared scratch, a read-only image
baked at build time). Nothing here touches the disk until a function is called.

Parallel jobs (a job array segmenting one folder, several notebooks) share one cache, so every write into
it happens under an exclusive ``fcntl.flock`` on a ``<file>.lock`` beside the target. ``flock`` exists on
Linux and macOS, the platforms kitsseg targets; on other systems writing into the cache raises a
:class:`~kitsseg.errors.WeightsError` that says so (reading shipped or cached weights still works).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import env
from ..errors import KitssegError, OutputError, WeightsError
from ..io.atomic import write_text_atomic

try:  # Linux and macOS; see the module docstring
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Environment variable that moves the cache folder (read through :mod:`kitsseg.env`).
HOME_ENV = env.HOME
#: Environment variable that forbids any network access when set to 1/true/yes/on.
OFFLINE_ENV = env.OFFLINE
#: The local index of weights that are not in the registry (imported files, pulls of bare URLs).
INDEX_NAME = "index.json"
INDEX_FORMAT = "kitsseg-weights-index/1"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The weights cache folder: ``cache_dir``, else ``$KITSSEG_HOME``, else the platform's user cache.

    The folder is not created here; writers create it when they first need it.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    home = env.home()
    if home is not None:
        return home
    import platformdirs

    return Path(platformdirs.user_cache_dir("kitsseg"))


def describe_root(root: Path) -> tuple[str, str]:
    """``(what, fix)`` for messages about the cache folder ``root``: where it came from and how to move it.

    A folder named by ``KITSSEG_HOME`` is fixed there, not with an option the user never gave.
    """
    home = env.home()
    if home is not None and home == root:
        return f"the weights cache folder {root} (from {HOME_ENV})", f"point {HOME_ENV} at a writable folder"
    return f"the weights cache folder {root}", f"set {HOME_ENV} or --cache-dir to a writable folder"


def _file_in_the_way(root: Path) -> Path | None:
    """The first of ``root`` and its parents that exists but is not a folder (a file where it belongs)."""
    return next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)


def check_root_is_folder(root: Path) -> None:
    """Refuse a cache location that is a file (or lies under one) before anything is read from it."""
    blocker = _file_in_the_way(root)
    if blocker is not None:
        what, fix = describe_root(root)
        where = "is a file" if blocker == root else f"lies under {blocker}, which is a file"
        raise WeightsError(f"{what} {where}, not a folder; {fix}")


def ensure_writable_root(root: Path) -> None:
    """Create the cache folder if needed and make sure files can be created in it, or say what to do.

    Raises :class:`OutputError` for a file in the way, a folder that cannot be created, or one that is
    not writable (permissions, a read-only mount).
    """
    what, fix = describe_root(root)
    try:
        check_root_is_folder(root)
    except WeightsError as exc:
        raise OutputError(str(exc)) from None
    with cache_write_errors(root):
        root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK | os.X_OK):
        raise OutputError(f"{what} is not writable; {fix}")


@contextlib.contextmanager
def cache_write_errors(root: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing into the cache (read-only mount, immutable folder, permissions,
    a full disk) into one :class:`OutputError` line that names the cache folder and how to move it."""
    try:
        yield
    except KitssegError:
        raise
    except OSError as exc:
        what, fix = describe_root(root)
        raise OutputError(f"cannot write to {what}: {exc.strerror or exc}; {fix}") from exc


def is_offline(offline: bool | None = None) -> bool:
    """Whether the network is forbidden: the explicit flag if given, else ``$KITSSEG_OFFLINE``."""
    if offline is not None:
        return bool(offline)
    return env.offline()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the duration of the block.

    Blocks while another process holds it (``on_wait`` is called once before blocking, e.g. to tell the
    user). The lock is released when the process dies, so a killed job never wedges the cache. The holder
    removes the lock file on release; a waiter that then wakes up on the removed file notices (its inode is
    no longer the one at ``path``) and locks the new file instead, so removal never lets two holders in.
    """
    if fcntl is None:  # pragma: no cover - Windows
        raise WeightsError(
            "writing to the weights cache needs fcntl file locks (Linux or macOS); on this system place "
            "weights files by hand and pass their path to --weights"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed this file; lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def lock_path(target: Path) -> Path:
    """The lock file that guards writes of ``target``."""
    return target.with_name(target.name + ".lock")


def read_index(root: Path) -> dict[str, dict[str, Any]]:
    """The local weights index of a cache folder: ``{name: {file, sha256, size, source, added}}``.

    A missing index is empty; a damaged one is reported (it is small and rebuilt by re-importing). A cache
    location that is a file is reported as such (deleting the index would not help).
    """
    check_root_is_folder(root)
    path = root / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise WeightsError(
            f"the local weights index {path} cannot be read ({exc}); delete it and import the weights again"
        ) from exc
    except OSError as exc:
        raise WeightsError(
            f"the local weights index {path} cannot be read ({exc.strerror or exc}); check that it is a "
            "readable file"
        ) from exc
    weights = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise WeightsError(f"the local weights index {path} is not a kitsseg index; delete it and re-import")
    entries = {str(k): dict(v) for k, v in weights.items() if isinstance(v, dict)}
    # `list` refused an entry whose file names a folder ("../x.pt"), but `path`, `verify` and `--weights
    # NAME` joined it to the cache folder and used a file outside the cache: every reader checks it here.
    from .registry import _NAME_RE

    for name, record in entries.items():
        file = record.get("file")
        if not isinstance(file, str) or not _NAME_RE.fullmatch(file):
            raise WeightsError(
                f"the local weights index {path}: entry {name!r}: 'file' must be a plain file name in the "
                f"cache folder, got {file!r}; delete the index and import the weights again"
            )
    return entries


def record_in_index(root: Path, name: str, record: dict[str, Any]) -> None:
    """Add or replace one entry of the local index, under its lock, written atomically."""
    ensure_writable_root(root)
    index_path = root / INDEX_NAME
    with cache_write_errors(root), file_lock(lock_path(index_path)):
        weights = read_index(root)
        weights[name] = {**record, "added": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps({"format": INDEX_FORMAT, "weights": weights}, indent=2, sort_keys=True)
        write_text_atomic(index_path, text + "\n")
