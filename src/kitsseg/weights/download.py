"""Fetching one file over HTTP(S) into the cache: streamed, resumable, retried, verified, atomic, locked.

The weak spots of model downloads in this field are half-finished files, proxies that cut transfers, and
parallel jobs writing one file at once. :func:`download` answers each of them:

- bytes stream into ``<file>.partial`` beside the target; a broken transfer keeps what arrived, and the
  next attempt (or the next run) asks only for the rest with an HTTP ``Range`` header. A server that
  ignores ``Range`` answers 200 with the whole file, and the partial file is then rewritten from the start;
- transient failures (connection errors, timeouts, 408/429/5xx, short bodies) are retried a bounded number
  of times with exponential backoff; 404 and other client errors are not;
- the sha256 is checked before ``os.replace`` moves the file into place, so the final name only ever
  holds a verified file; a mismatch deletes the download and says so;
- everything happens under an exclusive lock on ``<file>.lock``: a second process waits, then finds the
  verified file and returns it without downloading again.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ChecksumError, WeightsError
from ..io.fingerprint import sha256_file
from .cache import cache_write_errors, file_lock, lock_path

if TYPE_CHECKING:
    import requests
    from rich.console import Console
    from rich.progress import Progress, TaskID


@dataclass(frozen=True)
class DownloadPolicy:
    """How patient a download is. ``sleep`` is injectable so tests exercise retries without waiting.

    Attributes
    ----------
    retries:
        Attempts after the first one (so ``retries=3`` makes at most four requests).
    backoff, max_backoff:
        Wait ``backoff * 2**k`` seconds (at most ``max_backoff``) before retry ``k + 1``.
    timeout:
        ``(connect, read)`` seconds for ``requests``; the read timeout applies between bytes, so a slow but
        living transfer is not cut.
    chunk_size:
        Bytes per write; a cut connection loses at most the chunk being read, so it stays small.
    """

    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    timeout: tuple[float, float] = (10.0, 60.0)
    chunk_size: int = 1 << 14
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return float(min(self.max_backoff, self.backoff * (2**attempt)))


class _Transient(Exception):
    """A failure worth retrying (the partial file is kept for the next attempt)."""


def partial_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` accumulate until they are verified."""
    return dest.with_name(dest.name + ".partial")


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    progress: bool | Console = False,
    policy: DownloadPolicy | None = None,
    session: requests.Session | None = None,
    validate: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resuming, retrying, verifying ``sha256`` when given) and return ``dest``.

    If ``dest`` already exists and matches ``sha256``, nothing is fetched: this is how a process that
    waited for the lock picks up the file another process just finished. Without ``sha256`` the file is
    always fetched again (the caller decides whether a pinned hash is needed). ``validate`` is called on
    the finished, verified bytes before they are moved into place; whatever it raises deletes them.

    Raises
    ------
    WeightsError
        404 and other client errors (no retry), or transient failures beyond ``policy.retries``; the
        ``.partial`` file is kept so the next call resumes.
    ChecksumError
        The finished download does not match ``sha256``; it is deleted.
    OutputError
        The cache folder cannot be written (a read-only mount, permissions, a full disk).
    """
    policy = policy or DownloadPolicy()
    dest = Path(dest)
    with cache_write_errors(dest.parent):  # network failures are WeightsErrors by then; these are the disk's
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _download_locked(url, dest, sha256, progress, policy, session, validate)


def _download_locked(
    url: str,
    dest: Path,
    sha256: str | None,
    progress: bool | Console,
    policy: DownloadPolicy,
    session: requests.Session | None,
    validate: Callable[[Path], None] | None,
) -> Path:
    """:func:`download` once its folder exists: everything under the lock of ``dest``."""
    console = _console(progress)
    expected = sha256.lower() if sha256 else None

    def tell_wait() -> None:
        if console is not None:
            console.print(f"waiting for another process that is downloading {dest.name} ...")

    with file_lock(lock_path(dest), on_wait=tell_wait):
        if expected and dest.is_file() and sha256_file(dest) == expected:
            return dest
        partial = partial_path(dest)
        import requests

        own_session = session is None
        sess = session if session is not None else requests.Session()
        try:
            with _progress(console, dest.name) as bar:
                _fetch_with_retries(url, partial, policy, sess, bar, console)
        finally:
            if own_session:
                sess.close()
        if expected:
            actual = sha256_file(partial)
            if actual != expected:
                partial.unlink(missing_ok=True)
                raise ChecksumError(
                    f"the download of {url} does not match its sha256: expected {expected} but got {actual}; "
                    "deleted the download. The transfer was corrupted or the file on the server changed: "
                    "try again, or check the URL and the sha256"
                )
        if validate is not None:
            try:
                validate(partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, dest)
    return dest


def _fetch_with_retries(
    url: str,
    partial: Path,
    policy: DownloadPolicy,
    sess: requests.Session,
    bar: _Bar | None,
    console: Console | None,
) -> None:
    import requests

    attempt = 0
    while True:
        try:
            _fetch_once(url, partial, policy, sess, bar)
            return
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise WeightsError(f"{url!r} is not a valid URL ({exc})") from exc
        except requests.exceptions.InvalidSchema as exc:
            raise WeightsError(f"{url!r}: only http:// and https:// URLs can be downloaded") from exc
        except (_Transient, requests.RequestException) as exc:
            last = exc
        if attempt >= policy.retries:
            kept = ""
            if partial.exists():
                kept = (
                    f"; the {partial.stat().st_size} bytes received so far are kept in {partial} "
                    "and the next pull resumes from there"
                )
            raise WeightsError(
                f"could not download {url} after {attempt + 1} attempt(s): {_describe(last)}{kept}"
            ) from last
        wait = policy.delay(attempt)
        if console is not None:
            from rich.markup import escape  # a reason quoting a URL or path must not be read as markup

            console.print(f"[yellow]{escape(_describe(last))}; retrying in {wait:g} s[/]", highlight=False)
        policy.sleep(wait)
        attempt += 1


def _fetch_once(
    url: str, partial: Path, policy: DownloadPolicy, sess: requests.Session, bar: _Bar | None
) -> None:
    """One request: resume from the partial file's length if there is one, append what arrives."""
    offset = partial.stat().st_size if partial.exists() else 0
    # identity: the byte offsets of Range must be those of the file, not of a gzip stream
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with sess.get(url, stream=True, timeout=policy.timeout, headers=headers) as resp:
        status = resp.status_code
        if status == 416 and offset:
            _, total = _content_range(resp.headers.get("Content-Range", ""))
            if total == offset:
                return  # the partial file already holds everything (a run stopped before the rename)
            partial.unlink(missing_ok=True)
            raise _Transient("the server refused to resume the partial download; starting over")
        if status in (404, 410):
            raise WeightsError(
                f"{url} answered {status} {resp.reason}: there is no file at that address; check the URL "
                "(or the registry entry's urls)"
            )
        if status in (408, 429) or status >= 500:
            raise _Transient(f"the server answered {status} {resp.reason}")
        if status == 206 and offset:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:
                partial.unlink(missing_ok=True)
                raise _Transient(f"the server resumed at byte {start}, not {offset}; starting over")
            mode = "ab"
        elif status == 200:
            mode, offset = "wb", 0  # no Range asked, or the server ignored it: rewrite from the start
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise WeightsError(f"{url} answered {status} {resp.reason}; the download was not attempted again")
        received = offset
        if bar is not None:
            bar.start(total, offset)
        with open(partial, mode) as fh:
            for chunk in resp.iter_content(chunk_size=policy.chunk_size):
                fh.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.advance(received)
            fh.flush()
            os.fsync(fh.fileno())
    if total is not None and received != total:
        if received > total:
            partial.unlink(missing_ok=True)
        raise _Transient(f"the connection closed after {received} of {total} bytes")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 100); ``bytes */100`` -> (None, 100); anything else -> (None, None)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _describe(exc: BaseException) -> str:
    """A short reason for a failed attempt (requests' own messages run to several hundred characters)."""
    import requests

    text = str(exc) or type(exc).__name__
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        text = "the connection broke during the transfer"
    elif isinstance(exc, requests.Timeout):
        text = "the server did not answer in time"
    elif isinstance(exc, requests.ConnectionError):
        text = "cannot connect" + (f" ({errno.group(0).strip()})" if errno else "")
    return text if len(text) < 200 else text[:197] + "..."


def _console(progress: bool | Console) -> Console | None:
    if progress is False or progress is None:
        return None
    if progress is True:
        from rich.console import Console

        return Console(stderr=True)
    return progress


class _Bar:
    """A thin wrapper so the download loop does not depend on rich."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def start(self, total: int | None, completed: int) -> None:
        self._progress.update(self._task, total=total, completed=completed)

    def advance(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)


@contextlib.contextmanager
def _progress(console: Console | None, label: str) -> Iterator[_Bar | None]:
    if console is None:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        yield _Bar(progress, progress.add_task(label, total=None))
