"""A small HTTP chunk store in a thread that misbehaves on purpose: it serves a store directory
except where the test says otherwise, and can hold requests until the test releases them.

Holding is how tests get a slow or stalled peer without betting on time: a client that must be
interrupted mid-transfer, or must open many connections at once, is made to wait at a known
point for as long as the test needs, never for a number of seconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from procutil import HANG_GUARD

Behaviour = Callable[[BaseHTTPRequestHandler, str, int, "bytes | None"], bool]


class Gate:
    """Lets the first `allow` requests through, holds every later one until `release()`.

    `held` is set once a request is being held (the client is then stalled for sure);
    `waiting()` counts the requests held right now.
    """

    def __init__(self, allow: int = 0):
        self.allow = allow
        self.passed = 0
        self.held = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._waiting = 0
        self._drop = False
        self._changed = threading.Condition(self._lock)

    def __call__(self, handler: BaseHTTPRequestHandler, path: str, count: int, body: bytes | None) -> bool:
        """A `behave` hook: returns False (serve as usual) once let through."""
        with self._lock:
            if self.passed < self.allow:
                self.passed += 1
                return False
            self._waiting += 1
            self._changed.notify_all()
        self.held.set()
        self._open.wait()
        with self._lock:
            self._waiting -= 1
        if self._drop:  # cut the connection instead of answering
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return True
        return False

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def wait_for_waiting(self, n: int) -> None:
        """Block until at least `n` requests are held at once."""
        with self._lock:
            assert self._changed.wait_for(lambda: self._waiting >= n, HANG_GUARD), \
                f"{self._waiting} requests held, expected {n}"

    def release(self, drop: bool = False) -> None:
        """Let held requests go on (answered as usual), or with `drop` cut their connections."""
        self._drop = drop
        self._open.set()


class FaultServer(ThreadingHTTPServer):
    """Serves a store directory, except where `behave(handler, path, count, body)` says otherwise.

    `behave` returns True when it answered itself; `count` numbers requests per path from 1.
    """

    daemon_threads = True
    request_queue_size = 128  # clients that open many connections at once are not left in SYN retries

    def __init__(self, store: Path | None, behave: Behaviour | None = None):
        self.store = store
        self.behave = behave
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.gates: list[Gate] = []
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def gets(self) -> int:
        """How many chunk GETs were asked for."""
        with self.lock:
            return sum(1 for method, path in self.requests if method == "GET" and path.endswith(".cacnk"))

    def stop(self) -> None:
        if isinstance(self.behave, Gate):
            self.behave.release()
        self.shutdown()
        self.server_close()


class _FaultHandler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes | None:
        if self.server.store is None:
            return None
        target = (self.server.store / self.path.lstrip("/")).resolve()
        if self.server.store.resolve() not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def _serve(self, send_body: bool) -> None:
        with self.server.lock:
            count = self.server.counts[self.path] = self.server.counts.get(self.path, 0) + 1
            self.server.requests.append((self.command, self.path))
        body = self._body()
        if self.server.behave is not None and self.server.behave(self, self.path, count, body):
            return
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)


def answer(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"") -> bool:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
    return True
