"""A lean keep-alive HTTP/1.1 client for chunk requests.

Why: a chunk store is tens of thousands of small GETs per gigabyte, and the
general-purpose stack (urllib3 over http.client, with its URL re-encoding and
email-based header parsing) costs several hundred microseconds of CPU per
request on these machines, more than decompressing and verifying the chunk.
This client keeps one connection per thread, writes the request in one
send, and parses just status, Content-Length / chunked / read-to-close
framing and Connection (HTTP/1.0 answers close unless keep-alive).
Anything unusual (a proxy, a redirect) is left to urllib3 by the caller
(HttpClient).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024  # an unframed body (read to close) larger than any chunk or index is refused


class ProtocolError(OSError):
    """The server's answer is not HTTP we understand (the caller retries or falls back)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    data: bytes


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.deadline: float | None = None  # monotonic time the current request must end by

    def _recv(self) -> bytes:
        if self.deadline is not None:  # a whole-request limit, not one per read: slow drips end too
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(remaining)
        return self.sock.recv(262144)

    def _fill(self) -> None:
        data = self._recv()
        if not data:
            raise ConnectionResetError("connection closed by the server")
        self.buf += data

    def read_until(self, marker: bytes, limit: int) -> bytes:
        start = 0
        while True:
            end = self.buf.find(marker, start)
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[: end + len(marker)]
                return out
            if len(self.buf) > limit:
                raise ProtocolError("response head too large")
            start = max(0, len(self.buf) - len(marker) + 1)
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_close(self, limit: int) -> bytes:
        """Everything until the server closes the connection (a body without framing)."""
        while data := self._recv():
            self.buf += data
            if len(self.buf) > limit:
                raise ProtocolError("response body too large")
        out = bytes(self.buf)
        self.buf.clear()
        return out

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
        conn = _Conn(sock)
        with self._lock:
            self._all.append(conn)
        return conn

    def request(self, method: str, path: str, body: bytes | None = None) -> Response:
        """One request; a reused connection that turns out closed is reopened once."""
        conn: _Conn | None = getattr(self._local, "conn", None)
        fresh = conn is None
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            return self._exchange(conn, method, path, body)
        except (ConnectionError, ProtocolError, ssl.SSLError, OSError) as e:
            self._drop(conn)
            if fresh or isinstance(e, TimeoutError):
                raise
            conn = self._local.conn = self._connect()
            try:
                return self._exchange(conn, method, path, body)
            except BaseException:
                self._drop(conn)
                raise

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)

    def _exchange(self, conn: _Conn, method: str, path: str, body: bytes | None) -> Response:
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n"
        payload = (head + "\r\n").encode("latin-1")
        if self.timeout is not None:
            conn.deadline = time.monotonic() + self.timeout
            conn.sock.settimeout(self.timeout)
        conn.sock.sendall(payload + body if body else payload)
        while True:
            status, headers, keep_alive = self._read_head(conn)
            if status >= 200 or status == 101:
                break  # skip 100 Continue and other interim answers
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower():
            data = self._read_body(conn, headers)
        else:  # no framing: the body ends when the server closes the connection (HTTP/1.0 style)
            data = conn.read_to_close(MAX_BODY)
            keep_alive = False
        if not keep_alive:
            self._drop(conn)
        return Response(status, headers, data)

    @staticmethod
    def _read_head(conn: _Conn) -> tuple[int, dict[str, str], bool]:
        """Status, headers, and whether the connection stays open afterwards."""
        head = conn.read_until(b"\r\n\r\n", MAX_HEAD).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"malformed status line {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = "keep-alive" in connection if parts[0] == "HTTP/1.0" else "close" not in connection
        return int(parts[1]), headers, keep_alive

    @staticmethod
    def _read_body(conn: _Conn, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            pieces = []
            while True:
                size_line = conn.read_until(b"\r\n", 1024).split(b";", 1)[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise ProtocolError("malformed chunked encoding") from None
                if size == 0:
                    while conn.read_until(b"\r\n", MAX_HEAD):  # trailers
                        pass
                    return b"".join(pieces)
                pieces.append(conn.read_exact(size))
                conn.read_exact(2)
        length = headers.get("content-length", "")
        if not length.isdigit():
            raise ProtocolError("malformed Content-Length")
        return conn.read_exact(int(length))

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
