"""kitsseg.weights.download against a real local HTTP server (resume, retries, verification, locking)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from httpserver import FileServer
from kitsseg.errors import ChecksumError, WeightsError
from kitsseg.io.fingerprint import sha256_file
from kitsseg.weights.download import DownloadPolicy, _content_range, download, partial_path

DATA = bytes(range(256)) * 200  # 51,200 bytes: several chunks
SHA = hashlib.sha256(DATA).hexdigest()


class Sleeps(list):
    """An injectable sleep that records instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def policy(sleeps: Sleeps, retries: int = 3) -> DownloadPolicy:
    return DownloadPolicy(retries=retries, timeout=(5.0, 5.0), chunk_size=4096, sleep=sleeps)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_clean_download_verifies_and_leaves_only_the_file(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    dest = download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert dest.read_bytes() == DATA
    assert leftovers(tmp_path) == ["w.pt"]  # no .partial, no .lock
    assert sleeps == []
    assert "Range" not in server.gets()[0].headers
    assert server.gets()[0].headers.get("Accept-Encoding") == "identity"


def test_existing_verified_file_is_not_downloaded_again(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    download(url, tmp_path / "w.pt", sha256=SHA.upper(), policy=policy(sleeps))
    assert len(server.gets()) == 1


def test_dropped_connection_is_resumed_with_range(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    half = len(DATA) // 2
    server.drop_after("/w.pt", half)
    dest = download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert sha256_file(dest) == SHA
    first, second = server.gets()
    assert "Range" not in first.headers
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= half  # resumed from what had been written, not from zero
    assert sleeps == [1.0]  # one backoff before the retry
    assert leftovers(tmp_path) == ["w.pt"]


def test_interrupted_download_keeps_partial_and_next_call_resumes(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    server.drop_after("/w.pt", 10_000)
    with pytest.raises(WeightsError, match=r"after 1 attempt.*\d+ bytes received so far are kept") as info:
        download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps, retries=0))
    assert not isinstance(info.value, ChecksumError)
    kept = partial_path(tmp_path / "w.pt").stat().st_size
    assert 0 < kept <= 10_000
    assert f"{kept} bytes received" in str(info.value)
    assert not (tmp_path / "w.pt").exists()
    download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert server.gets()[-1].headers["Range"] == f"bytes={kept}-"
    assert (tmp_path / "w.pt").read_bytes() == DATA
    assert leftovers(tmp_path) == ["w.pt"]


def test_server_ignoring_range_restarts_cleanly(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    server.ignore_range = True
    partial_path(tmp_path / "w.pt").write_bytes(DATA[:5000])
    dest = download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert server.gets()[0].headers["Range"] == "bytes=5000-"
    assert dest.read_bytes() == DATA  # rewritten from byte 0, not appended


def test_complete_partial_answered_416_is_finished(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    partial_path(tmp_path / "w.pt").write_bytes(DATA)  # a run stopped between download and rename
    dest = download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert dest.read_bytes() == DATA
    assert len(server.gets()) == 1


def test_wrong_sha256_deletes_everything(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=f"expected {wrong} but got {SHA}; deleted the download"):
        download(url, tmp_path / "w.pt", sha256=wrong, policy=policy(sleeps))
    assert leftovers(tmp_path) == []


def test_corrupting_server_is_caught(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    server.serve_wrong("/w.pt")
    with pytest.raises(ChecksumError, match="deleted the download"):
        download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert leftovers(tmp_path) == []


def test_404_names_the_url_and_is_not_retried(server, sleeps, tmp_path):
    url = server.url("/missing.pt")
    with pytest.raises(WeightsError, match=r"missing\.pt answered 404") as info:
        download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps))
    assert url in str(info.value)
    assert len(server.gets()) == 1
    assert sleeps == []
    assert leftovers(tmp_path) == []


def test_server_errors_are_retried_with_exponential_backoff(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)
    server.status("/w.pt", 503)
    with pytest.raises(WeightsError, match="after 4 attempt.*503"):
        download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps, retries=3))
    assert sleeps == [1.0, 2.0, 4.0]
    assert len(server.gets()) == 4
    server.clear_status("/w.pt")
    assert download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps)).read_bytes() == DATA


def test_backoff_is_capped():
    assert DownloadPolicy(backoff=1.0, max_backoff=5.0).delay(10) == 5.0


def test_unreachable_host_fails_after_retries(sleeps, tmp_path):
    with FileServer() as srv:
        url = srv.url("/w.pt")
    with pytest.raises(WeightsError, match="could not download"):  # the port is closed now
        download(url, tmp_path / "w.pt", sha256=SHA, policy=policy(sleeps, retries=1))
    assert sleeps == [1.0]


def test_non_http_url_is_refused(sleeps, tmp_path):
    with pytest.raises(WeightsError, match="only http"):
        download("ftp://example.org/w.pt", tmp_path / "w.pt", policy=policy(sleeps))


def test_validate_hook_failure_deletes_the_download(server, sleeps, tmp_path):
    url = server.serve("/w.pt", DATA)

    def refuse(path: Path) -> None:
        raise WeightsError("not a weights file")

    with pytest.raises(WeightsError, match="not a weights file"):
        download(url, tmp_path / "w.pt", validate=refuse, policy=policy(sleeps))
    assert leftovers(tmp_path) == []


def test_progress_bar_on_a_non_terminal_console(server, sleeps, tmp_path):
    import io

    from rich.console import Console

    buf = io.StringIO()
    url = server.serve("/w.pt", DATA)
    server.drop_after("/w.pt", 20_000)
    download(url, tmp_path / "w.pt", sha256=SHA, progress=Console(file=buf), policy=policy(sleeps))
    assert "w.pt" in buf.getvalue()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes 10-99/100", (10, 100)),
        ("bytes */100", (None, 100)),
        ("garbage", (None, None)),
        ("", (None, None)),
    ],
)
def test_content_range_parsing(header, expected):
    assert _content_range(header) == expected


# -- two processes, one cache --------------------------------------------------------------------------


def _pull_in_child(url: str, dest: str, sha: str, start, out) -> None:  # runs in a spawned process
    start.wait(10)
    try:
        path = download(url, dest, sha256=sha, policy=DownloadPolicy(retries=0, sleep=lambda s: None))
        out.put(("ok", str(path), os.getpid()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(exc), os.getpid()))


def test_two_processes_pulling_at_once_end_with_one_good_file(server, tmp_path):
    server.chunk = 2048
    server.chunk_delay = 0.02  # ~0.5 s transfer, so the second process arrives while the first holds the lock
    url = server.serve("/w.pt", DATA)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_pull_in_child, args=(url, str(tmp_path / "w.pt"), SHA, start, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert {r[1] for r in results} == {str(tmp_path / "w.pt")}
    assert sha256_file(tmp_path / "w.pt") == SHA
    assert leftovers(tmp_path) == ["w.pt"]
    assert len(server.gets()) == 1  # the second process waited for the lock and found the verified file
