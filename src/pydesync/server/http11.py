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
import selectors
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TextIO

from ..netio import SocketReader, decimal, send_parts, set_timeouts

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
        size = decimal(self.headers.get("content-length", ""))
        if size is None:
            self._conn.reply(self, 411, b"Content-Length required\n")
            self._conn.keep_alive = False
            return None
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
        self.reader = SocketReader(sock)
        self.keep_alive = True
        self.queued: list[bytes | bytearray | memoryview] | None = None  # loop mode: replies wait here
        self.writing = False  # loop mode: waiting for the socket to drain
        self.head_since: float | None = None  # loop mode: when the pending request head began
        self.last_active = time.monotonic()
        self.tls = isinstance(sock, ssl.SSLSocket)

    # ---- input ---------------------------------------------------------------------------------
    def read_exact(self, n: int) -> bytearray | None:
        return self.reader.read_exact(n)

    def _read_head(self) -> bytes | None:
        """The next request's head; None when the client closes between requests. A started head
        must be complete within HEAD_TIMEOUT (a deadline checked between reads)."""
        reader = self.reader
        reader.deadline = None
        if not reader.buffered() and not reader.fill():  # idle: up to IDLE_TIMEOUT
            return None
        reader.deadline = time.monotonic() + HEAD_TIMEOUT
        try:
            head = reader.read_until(b"\r\n\r\n", MAX_HEAD)
        except ValueError:
            raise BadRequest(431, "request head too large") from None
        if head is None and reader.buffered() and bytes(reader.peek()).strip():
            raise BadRequest(400, "incomplete request")
        reader.deadline = None
        return head

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
    def _head(self, status: int, length: int | None, content_type: str) -> bytes:
        """A response head; length None = a body ended by closing the connection."""
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {status} {phrase}", "Server: pydesync", f"Content-Type: {content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if not self.keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def reply(self, req: Request, status: int, body: bytes = b"",
              content_type: str = "text/plain; charset=utf-8") -> None:
        head = self._head(status, len(body), content_type)
        self._send(head, b"" if req.method == "HEAD" else body)
        self._log(req, status)

    def _send(self, head: bytes, body: bytes | bytearray | memoryview) -> None:
        if self.queued is not None:
            self.queued += (head, body) if body else (head,)
        else:
            send_parts(self.sock, head, body)

    def reply_stream(self, req: Request,
                     content_type: str = "application/octet-stream") -> Callable[[bytes], None]:
        """200 with a body of unknown length, ended by closing the connection (threaded connections
        only); returns the function that writes the body."""
        self.keep_alive = False
        self.sock.sendall(self._head(200, None, content_type))
        self._log(req, 200)
        return self.sock.sendall

    def reply_file(self, req: Request, fd: int, size: int,
                   content_type: str = "application/octet-stream") -> None:
        """200 with a file's bytes, sent by the kernel (sendfile) where the socket allows."""
        head = self._head(200, size, content_type)
        if req.method == "HEAD":
            self._send(head, b"")
        elif self.tls or size <= INLINE_FILE or self.queued is not None:
            self._send(head, os.pread(fd, size, 0))
        else:
            self.sock.sendall(head)
            self.sock.settimeout(IDLE_TIMEOUT)  # socket.sendfile needs Python's timeout to honour one
            try:
                with os.fdopen(os.dup(fd), "rb") as f:
                    self.sock.sendfile(f, 0, size)
            finally:
                set_timeouts(self.sock, IDLE_TIMEOUT)
        self._log(req, 200)

    def _log(self, req: Request, status: int) -> None:
        if self.log is None:
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        with self.log_lock:
            self.log.write(f"{stamp} Client: {self.client[0]}:{self.client[1]}, "
                           f"Request: {req.method} {req.target}, Response: {status}\n")
            self.log.flush()

    # ---- serving -------------------------------------------------------------------------------
    def next_request(self) -> Request | None:
        """Read and parse the next request head (blocking); None when the client is done.
        A malformed head is answered here (and ends the connection)."""
        try:
            head = self._read_head()
            if head is None:
                return None
            return self._parse(head)
        except BadRequest as e:
            self.refuse(e)
            return None

    def refuse(self, e: BadRequest) -> None:
        self.keep_alive = False
        dummy = Request("GET", "-", "HTTP/1.1", {}, self.client, self)
        self.reply(dummy, e.status, f"{e}\n".encode())

    def answer(self, req: Request) -> None:
        """Run the app on one request; afterwards keep_alive says whether another may follow."""
        try:
            self.app(req)
        except (OSError, ssl.SSLError):
            raise
        except Exception as e:  # a bug must cost one answer, not the connection silently
            sys.stderr.write(f"{req.method} {req.target}: internal error: {e!r}\n")
            self.keep_alive = False
            self.reply(req, 500, b"internal server error\n")
            return
        if not req.body_read and has_body(req):
            self.keep_alive = False  # an unread body would be taken for the next request

    def serve(self, first: Request | None = None) -> None:
        """Serve requests on this thread (blocking) until the connection ends; `first` is a
        request already read (by the event loop that handed the connection over)."""
        try:
            req = first
            while True:
                if req is None:
                    if not self.keep_alive:
                        return
                    req = self.next_request()
                    if req is None:
                        return
                self.answer(req)  # (a handed-over request is answered even with Connection: close)
                req = None
        except (OSError, TimeoutError, ssl.SSLError):
            return
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def has_body(req: Request) -> bool:
    return req.headers.get("content-length", "0") != "0" or "transfer-encoding" in req.headers


class Http11Server:
    """Listens on one address.

    Plain HTTP runs an event loop: requests that `quick(req)` accepts (a chunk read from a local
    store: no body, nothing that blocks for long) are answered on the loop thread, with no
    thread hand-offs, which on a few cores costs less than the work itself. The first request
    that is not quick moves its connection to a thread of its own for the rest of its life
    (uploads, proxied or converted chunks). TLS connections always get a thread each.
    """

    def __init__(self, address: tuple[str, int], app: Callable[[Request], None],
                 context: ssl.SSLContext | None = None, log: TextIO | None = None,
                 quick: Callable[[Request], bool] | None = None):
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
        self.quick = quick
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        if self.context is None and self.quick is not None:
            _EventLoop(self).run()
            return
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
        set_timeouts(client, IDLE_TIMEOUT)
        self.connection(client, address).serve()

    def describe(self) -> str:
        """How connections are served, for the start-up line."""
        if self.context is None and self.quick is not None:
            return "local chunk reads on one event loop, a thread per connection that needs more"
        return "a thread per connection"

    def connection(self, client: socket.socket, address: tuple[str, int]) -> Connection:
        return Connection(client, address[:2], self.app, self.log, self.log_lock)

    def shutdown(self) -> None:
        self._stop.set()

    def server_close(self) -> None:
        self.sock.close()


class _EventLoop:
    """One thread multiplexing every connection of a plain-HTTP server (see Http11Server)."""

    SWEEP = 5.0  # seconds between checks for idle or stalled connections

    def __init__(self, server: Http11Server):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.conns: set[Connection] = set()

    def run(self) -> None:
        server = self.server
        server.sock.setblocking(False)
        self.selector.register(server.sock, selectors.EVENT_READ, None)
        next_sweep = time.monotonic() + self.SWEEP
        try:
            while not server._stop.is_set():
                for key, events in self.selector.select(0.5):
                    if key.data is None:
                        self._accept()
                    elif events & selectors.EVENT_WRITE:
                        self._writable(key.data)
                    else:
                        self._readable(key.data)
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + self.SWEEP
        finally:
            for conn in list(self.conns):
                self._close(conn)
            self.selector.close()

    def _accept(self) -> None:
        while True:
            try:
                client, address = self.server.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if self.server._stop.is_set():
                    return
                raise
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            conn = self.server.connection(client, address)
            conn.queued = []
            self.conns.add(conn)
            self.selector.register(client, selectors.EVENT_READ, conn)

    def _readable(self, conn: Connection) -> None:
        try:
            got = conn.reader.fill_nowait()
        except OSError:
            got = False
        if got is None:
            return
        if not got:
            self._close(conn)
            return
        conn.last_active = time.monotonic()
        if conn.head_since is None:
            conn.head_since = conn.last_active
        self._answer_buffered(conn)

    def _answer_buffered(self, conn: Connection) -> None:
        """Answer every complete request in conn's buffer, in order; hand the connection to a
        thread at the first request that is not quick."""
        while conn.keep_alive:
            try:
                head = conn.reader.take_until(b"\r\n\r\n", MAX_HEAD)
                if head is None:
                    return
                conn.head_since = time.monotonic() if conn.reader.buffered() else None
                req = conn._parse(head)
            except (BadRequest, ValueError) as e:
                conn.refuse(e if isinstance(e, BadRequest) else BadRequest(431, "request head too large"))
                break
            quick = self.server.quick
            if has_body(req) or quick is None or not quick(req):
                self._to_thread(conn, req)
                return
            try:
                conn.answer(req)
            except OSError:
                self._close(conn)
                return
            if not self._send_queued(conn):
                return  # the rest goes out (and later requests are read) when the socket drains
        if self._send_queued(conn):
            self._close(conn)

    def _send_queued(self, conn: Connection) -> bool:
        """Send conn's queued answers without blocking; True when all went out. Otherwise the
        connection waits for writability and reads nothing more until then."""
        queued = conn.queued
        assert queued is not None
        try:
            while queued:
                sent = conn.sock.sendmsg(queued[:64])
                while sent:
                    first = queued[0]
                    if sent >= len(first):
                        sent -= len(first)
                        queued.pop(0)
                    else:
                        queued[0] = memoryview(first)[sent:]
                        sent = 0
        except (BlockingIOError, InterruptedError):
            if not conn.writing:
                conn.writing = True
                self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return False
        except OSError:
            self._close(conn)
            return False
        conn.last_active = time.monotonic()
        return True

    def _writable(self, conn: Connection) -> None:
        if not self._send_queued(conn):
            return
        conn.writing = False
        if not conn.keep_alive:
            self._close(conn)
            return
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self._answer_buffered(conn)  # requests that arrived meanwhile

    def _to_thread(self, conn: Connection, req: Request) -> None:
        """From now on this connection is served, blocking, by a thread of its own."""
        self.selector.unregister(conn.sock)
        self.conns.discard(conn)
        conn.queued = None
        conn.sock.setblocking(True)
        set_timeouts(conn.sock, IDLE_TIMEOUT)
        threading.Thread(target=conn.serve, args=(req,), daemon=True).start()

    def _sweep(self) -> None:
        """Close connections idle past IDLE_TIMEOUT, sending a request head for longer than
        HEAD_TIMEOUT in all (a slow drip too), or not reading an answer for HEAD_TIMEOUT."""
        now = time.monotonic()
        for conn in list(self.conns):
            slow_head = conn.head_since is not None and now - conn.head_since > HEAD_TIMEOUT
            stalled = bool(conn.queued) and now - conn.last_active > HEAD_TIMEOUT
            if slow_head or stalled or now - conn.last_active > IDLE_TIMEOUT:
                self._close(conn)

    def _close(self, conn: Connection) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
        conn.close()
