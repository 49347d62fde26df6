"""A real HTTP server for download tests: a thread on 127.0.0.1, an ephemeral port, bytes from a dict.

It speaks enough HTTP for the download code's failure modes: ``Range`` requests answered with 206 (or
ignored on demand), a connection dropped after N bytes (once, or N times), 404s, wrong bytes of the right
length, and a per-chunk delay so concurrent clients really overlap. Every request is recorded (method,
path, headers) so tests can assert what the client asked for.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FileServer:
    """Serve ``files[path]``; configure misbehaviour per path through the methods below."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    chunk: int = 4096
    chunk_delay: float = 0.0
    ignore_range: bool = False
    _drops: dict[str, list[int]] = field(default_factory=dict)
    _status: dict[str, int] = field(default_factory=dict)
    _wrong: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- configuration --------------------------------------------------------------------------------

    def serve(self, path: str, data: bytes) -> str:
        """Publish ``data`` at ``path``; returns its URL."""
        self.files[path] = data
        return self.url(path)

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """Cut the connection after ``nbytes`` of the body, for the next ``times`` requests of ``path``."""
        self._drops[path] = [nbytes] * times

    def status(self, path: str, code: int) -> None:
        """Answer ``code`` (e.g. 404, 503) with an empty body for ``path``."""
        self._status[path] = code

    def clear_status(self, path: str) -> None:
        self._status.pop(path, None)

    def serve_wrong(self, path: str) -> None:
        """Serve bytes of the right length with the content flipped (a corrupting proxy)."""
        self._wrong.add(path)

    def url(self, path: str) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def gets(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and (path is None or r.path == path)]

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> FileServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling -----------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(Request("GET", path, dict(h.headers.items())))
            status = self._status.get(path)
            drops = self._drops.get(path)
            drop = drops.pop(0) if drops else None
        h.close_connection = True
        if status is not None or path not in self.files:
            code = status or 404
            h.send_response(code)
            h.send_header("Content-Length", "0")
            h.send_header("Connection", "close")
            h.end_headers()
            return
        data = self.files[path]
        if path in self._wrong:
            data = bytes(b ^ 0xFF for b in data)
        start, code = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", "") or "")
        if match and not self.ignore_range:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.send_header("Connection", "close")
                h.end_headers()
                return
            body = data[start : end + 1]
            code = 206
        else:
            body = data
        h.send_response(code)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Connection", "close")
        if code == 206:
            h.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        h.end_headers()
        limit = len(body) if drop is None else min(drop, len(body))
        sent = 0
        try:
            while sent < limit:
                piece = body[sent : min(limit, sent + self.chunk)]
                h.wfile.write(piece)
                h.wfile.flush()
                sent += len(piece)
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
        except (BrokenPipeError, ConnectionResetError):
            return
        if drop is not None:  # the body ends short of its Content-Length
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
