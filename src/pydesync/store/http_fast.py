"""A lean keep-alive HTTP/1.1 client for chunk requests.

Why: a chunk store is tens of thousands of small GETs per gigabyte, and the
general-purpose stack (urllib3 over http.client, with its URL re-encoding and
email-based header parsing) costs several hundred microseconds of CPU per
request on these machines, more than decompressing and verifying the chunk.
This client keeps one connection per thread, writes the request in one
send, has llhttp (httptools) parse each answer's head, and reads the body
itself: Content-Length straight into one buffer, chunked or read-to-close.
Anything unusual (a proxy, a redirect) is left to urllib3 by the caller
(HttpClient).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from ..codec import MAX_ENCODED_CHUNK
from ..netio import BodyTooLong, SocketReader, chunked_pieces, decimal, set_timeouts

MAX_HEAD = 64 * 1024


class BadResponse(OSError):
    """The server's answer is not HTTP we understand (the caller retries or falls back)."""


class TooLarge(BadResponse):
    """The answer's body is longer than the caller allows (not retried on a new connection)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    data: bytes | bytearray


class _Fields:
    """Collects a response's header fields from the parser (names lower-case)."""

    __slots__ = ("headers",)

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = SocketReader(sock)

    def read_until(self, marker: bytes, limit: int) -> bytes:
        try:
            out = self.reader.read_until(marker, limit)
        except ValueError:
            raise BadResponse("response head too large") from None
        if out is None:
            raise ConnectionResetError("connection closed by the server")
        return out

    def read_exact(self, n: int) -> bytearray:
        out = self.reader.read_exact(n)
        if out is None:
            raise ConnectionResetError("connection closed by the server")
        return out

    def read_to_close(self, limit: int) -> bytes:
        """Everything until the server closes the connection (a body without framing)."""
        try:
            return self.reader.read_to_close(limit)
        except BodyTooLong as e:
            raise TooLarge(f"answer {e}") from None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise TimeoutError("timed out") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class FastHttp:
    """Connections to one origin (scheme://host:port), one per calling thread."""

    def __init__(self, base: str, timeout: float | None, context: ssl.SSLContext | None,
                 headers: dict[str, str]):
        parts = urlsplit(base)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.timeout = timeout
        self.context = context
        host_header = parts.netloc.rsplit("@", 1)[-1]
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._fixed = f"Host: {host_header}\r\nAccept: */*\r\nUser-Agent: pydesync\r\n{extra}"
        self._local = threading.local()
        self._all: list[_Conn] = []
        self._lock = threading.Lock()

    def _connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.https:
            assert self.context is not None
            sock = self.context.wrap_socket(sock, server_hostname=self.host)
        set_timeouts(sock, self.timeout)
        conn = _Conn(sock)
        with self._lock:
            self._all.append(conn)
        return conn

    def _idle(self) -> list[_Conn]:
        """This thread's open connections with nothing in flight."""
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = []
        return idle

    def request(self, method: str, path: str, body: bytes | None = None,
                limit: int = MAX_ENCODED_CHUNK) -> Response:
        """One request; a reused connection that turns out closed is reopened once. An answer
        whose body is longer than `limit` is a BadResponse, before it is held in memory."""
        idle = self._idle()
        fresh = not idle
        conn = idle.pop() if idle else self._connect()
        try:
            self._send(conn, method, path, body)
            return self._receive(conn, method, limit)
        except (ConnectionError, BadResponse, ssl.SSLError, OSError) as e:
            self._drop(conn)
            if fresh or isinstance(e, (TimeoutError, TooLarge)):
                raise
            conn = self._connect()
            try:
                self._send(conn, method, path, body)
                return self._receive(conn, method, limit)
            except BaseException:
                self._drop(conn)
                raise

    def begin(self, method: str, path: str, limit: int = MAX_ENCODED_CHUNK) -> Callable[[], Response]:
        """Send a request now on one of this thread's connections (a new one if all are busy);
        the returned call reads its answer. Lets one thread keep several requests in flight.
        No retry here: the caller falls back to request() on errors."""
        idle = self._idle()
        fresh = not idle
        conn = idle.pop() if idle else self._connect()
        try:
            self._send(conn, method, path, None)
        except (ConnectionError, ssl.SSLError, OSError):
            self._drop(conn)
            if fresh:
                raise
            return functools.partial(self.request, method, path, None, limit)  # stale: start over
        except BaseException:
            self._drop(conn)
            raise

        def finish() -> Response:
            try:
                return self._receive(conn, method, limit)
            except (ConnectionError, BadResponse, ssl.SSLError, OSError) as e:
                self._drop(conn)
                if fresh or isinstance(e, (TimeoutError, TooLarge)):
                    raise
                return self.request(method, path, None, limit)  # a kept-alive one the server closed
            except BaseException:
                self._drop(conn)
                raise
        return finish

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)

    def _send(self, conn: _Conn, method: str, path: str, body: bytes | None) -> None:
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n"
        payload = (head + "\r\n").encode("latin-1")
        if self.timeout is not None:  # a whole-request limit, not one per read: slow drips end too
            conn.reader.deadline = time.monotonic() + self.timeout
        conn.send(payload + body if body else payload)

    def _receive(self, conn: _Conn, method: str, limit: int) -> Response:
        """The answer to the request sent on conn; conn goes back to this thread's idle list."""
        while True:
            status, headers, keep_alive = self._read_head(conn)
            if status >= 200 or status == 101:
                break  # skip 100 Continue and other interim answers
        if method == "HEAD" or status in (204, 304):
            data: bytes | bytearray = b""
        elif "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower():
            data = self._read_body(conn, headers, limit)
        else:  # no framing: the body ends when the server closes the connection (HTTP/1.0 style)
            data = conn.read_to_close(limit)
            keep_alive = False
        if keep_alive:
            self._idle().append(conn)
        else:
            self._drop(conn)
        return Response(status, headers, data)

    @staticmethod
    def _read_head(conn: _Conn) -> tuple[int, dict[str, str], bool]:
        """Status, headers, and whether the connection stays open afterwards. The head is parsed
        by llhttp (httptools); bodies are read here, straight into their buffer."""
        head = conn.read_until(b"\r\n\r\n", MAX_HEAD)
        fields = _Fields()
        parser = httptools.HttpResponseParser(fields)
        try:
            parser.feed_data(head + b"\r\n\r\n")
        except httptools.HttpParserError as e:
            raise BadResponse(f"malformed answer ({e}): {head[:80]!r}") from None
        return parser.get_status_code(), fields.headers, parser.should_keep_alive()

    @staticmethod
    def _read_body(conn: _Conn, headers: dict[str, str], limit: int) -> bytes | bytearray:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            try:
                return b"".join(chunked_pieces(conn.reader, limit))
            except BodyTooLong as e:
                raise TooLarge(f"answer {e}") from None
            except ValueError as e:
                raise BadResponse(str(e)) from None
        length = decimal(headers.get("content-length", ""))
        if length is None:
            raise BadResponse("malformed Content-Length")
        if length > limit:
            raise TooLarge(f"answer of {length} bytes, longer than {limit} bytes")
        return conn.read_exact(length)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def tls_context(trust_insecure: bool, ca_cert: str | None, client_cert: str | None,
                client_key: str | None) -> ssl.SSLContext:
    """A client TLS context from desync's options."""
    ctx = ssl.create_default_context(cafile=ca_cert) if ca_cert else ssl.create_default_context()
    if trust_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert:
        ctx.load_cert_chain(client_cert, client_key)
    return ctx
