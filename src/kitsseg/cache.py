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

from .atomic import write_text_atomic
from .errors import WeightsError

try:  # Linux and macOS; see the module docstring
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Environment variable that moves the cache folder.
HOME_ENV = "KITSSEG_HOME"
#: Environment variable that forbids any network access when set to 1/true/yes/on.
OFFLINE_ENV = "KITSSEG_OFFLINE"
#: The local index of weights that are not in the registry (imported files, pulls of bare URLs).
INDEX_NAME = "index.json"
INDEX_FORMAT = "kitsseg-weights-index/1"

_TRUE = {"1", "true", "yes", "on"}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The weights cache folder: ``cache_dir``, else ``$KITSSEG_HOME``, else the platform's user cache.

    The folder is not created here; writers create it when they first need it.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kitsseg"))


def is_offline(offline: bool | None = None) -> bool:
    """Whether the network is forbidden: the explicit flag if given, else ``$KITSSEG_OFFLINE``."""
    if offline is not None:
        return bool(offline)
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


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

    A missing index is empty; a damaged one is reported (it is small and rebuilt by re-importing).
    """
    path = root / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"the local weights index {path} cannot be read ({exc}); delete it and import the weights again"
        ) from exc
    weights = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise WeightsError(f"the local weights index {path} is not a kitsseg index; delete it and re-import")
    return {str(k): dict(v) for k, v in weights.items() if isinstance(v, dict)}


def record_in_index(root: Path, name: str, record: dict[str, Any]) -> None:
    """Add or replace one entry of the local index, under its lock, written atomically."""
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX_NAME
    with file_lock(lock_path(index_path)):
        weights = read_index(root)
        weights[name] = {**record, "added": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps({"format": INDEX_FORMAT, "weights": weights}, indent=2, sort_keys=True)
        write_text_atomic(index_path, text + "\n")
