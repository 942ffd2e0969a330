"""A small HTTP/1.1 server core for the chunk and index servers.

Why not http.server: it parses every request's headers with the email
package and writes each response in pieces, which costs ~200 µs a request;
a chunk store answers tens of thousands of tiny requests per gigabyte. The
protocol needed here is small: GET/HEAD/PUT with Content-Length bodies,
keep-alive, `Expect: 100-continue`, no chunked uploads. Responses go out in
one write, files with sendfile(2). Limits: 64 KiB of request head, 100
headers, idle connections closed after 120 s, a request head must arrive
within 30 s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TextIO

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
IDLE_TIMEOUT = 120.0
HEAD_TIMEOUT = 30.0
INLINE_FILE = 1 << 20  # smaller files go out with the head in one send (fewer syscalls than sendfile)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    client: tuple[str, int]
    _conn: Connection = field(repr=False)
    body_read: bool = False

    @property
    def path(self) -> str:
        return self.target

    def read_body(self, limit: int) -> bytes | None:
        """The body (Content-Length only); None after answering 411/413 when absent or too large."""
        self.body_read = True
        if "transfer-encoding" in self.headers:
            self._conn.reply(self, 411, b"chunked uploads are not supported; send Content-Length\n")
            self._conn.keep_alive = False
            return None
        length = self.headers.get("content-length", "")
        if not length.isdigit():
            self._conn.reply(self, 411, b"Content-Length required\n")
            self._conn.keep_alive = False
            return None
        size = int(length)
        if size > limit:
            self._conn.reply(self, 413, b"body too large\n")
            self._conn.keep_alive = False
            return None
        if self.headers.get("expect", "").lower() == "100-continue":
            self._conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return self._conn.read_exact(size)


class Connection:
    """One client connection: reads requests, hands them to the app, writes responses."""

    def __init__(self, sock: socket.socket, client: tuple[str, int], app: Callable[[Request], None],
                 log: TextIO | None, log_lock: threading.Lock):
        self.sock = sock
        self.client = client
        self.app = app
        self.log = log
        self.log_lock = log_lock
        self.buf = bytearray()
        self.keep_alive = True
        self.tls = isinstance(sock, ssl.SSLSocket)

    # ---- input ---------------------------------------------------------------------------------
    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _read_head(self) -> bytes | None:
        self.sock.settimeout(IDLE_TIMEOUT)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(431, "request head too large")
            if not self._fill():
                if self.buf.strip():
                    raise BadRequest(400, "incomplete request")
                return None
            self.sock.settimeout(HEAD_TIMEOUT)

    def _parse(self, head: bytes) -> Request:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
            raise BadRequest(400, "bad request") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "malformed request line")
        if len(lines) > MAX_HEADERS + 1:
            raise BadRequest(431, "too many headers")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, "malformed header")
            headers[name.lower()] = value.strip()
        method, target, version = parts
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        return Request(method, target, version, headers, self.client, self)

    # ---- output --------------------------------------------------------------------------------
    def _head(self, status: int, length: int, content_type: str) -> bytes:
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {status} {phrase}", "Server: pydesync", f"Content-Type: {content_type}",
                 f"Content-Length: {length}"]
        if not self.keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def reply(self, req: Request, status: int, body: bytes = b"",
              content_type: str = "text/plain; charset=utf-8") -> None:
        head = self._head(status, len(body), content_type)
        self.sock.sendall(head if req.method == "HEAD" else head + body)
        self._log(req, status)

    def reply_file(self, req: Request, fd: int, size: int,
                   content_type: str = "application/octet-stream") -> None:
        """200 with a file's bytes, sent by the kernel (sendfile) where the socket allows."""
        head = self._head(200, size, content_type)
        if req.method == "HEAD":
            self.sock.sendall(head)
        elif self.tls or size <= INLINE_FILE:
            self.sock.sendall(head + os.pread(fd, size, 0))
        else:
            self.sock.sendall(head)
            with os.fdopen(os.dup(fd), "rb") as f:
                self.sock.sendfile(f, 0, size)
        self._log(req, 200)

    def _log(self, req: Request, status: int) -> None:
        if self.log is None:
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        with self.log_lock:
            self.log.write(f"{stamp} Client: {self.client[0]}:{self.client[1]}, "
                           f"Request: {req.method} {req.target}, Response: {status}\n")
            self.log.flush()

    # ---- loop ----------------------------------------------------------------------------------
    def serve(self) -> None:
        try:
            while self.keep_alive:
                try:
                    head = self._read_head()
                    if head is None:
                        return
                    req = self._parse(head)
                except BadRequest as e:
                    self.keep_alive = False
                    dummy = Request("GET", "-", "HTTP/1.1", {}, self.client, self)
                    self.reply(dummy, e.status, f"{e}\n".encode())
                    return
                try:
                    self.app(req)
                except (OSError, ssl.SSLError):
                    raise
                except Exception as e:  # a bug must cost one answer, not the connection silently
                    sys.stderr.write(f"{req.method} {req.target}: internal error: {e!r}\n")
                    self.keep_alive = False
                    self.reply(req, 500, b"internal server error\n")
                    return
                if not req.body_read and (req.headers.get("content-length", "0") != "0"
                                          or "transfer-encoding" in req.headers):
                    self.keep_alive = False  # an unread body would be taken for the next request
        except (OSError, TimeoutError, ssl.SSLError):
            return
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()


class Http11Server:
    """Listens on one address; one thread per connection (daemon threads)."""

    def __init__(self, address: tuple[str, int], app: Callable[[Request], None],
                 context: ssl.SSLContext | None = None, log: TextIO | None = None):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(128)
        self.server_address = self.sock.getsockname()
        self.app = app
        self.context = context
        self.log = log
        self.log_lock = threading.Lock()
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, address = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._handle, args=(client, address), daemon=True).start()

    def _handle(self, client: socket.socket, address: tuple[str, int]) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            try:
                client.settimeout(HEAD_TIMEOUT)
                client = self.context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                client.close()
                return
        Connection(client, address[:2], self.app, self.log, self.log_lock).serve()

    def shutdown(self) -> None:
        self._stop.set()

    def server_close(self) -> None:
        self.sock.close()
