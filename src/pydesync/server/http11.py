"""The HTTP/1.1 server core of chunk-server, index-server and sync-serve.

One event-loop thread owns every connection, plain and TLS. It accepts, reads, and parses with
httptools (llhttp, the parser of Node.js and uvicorn); it answers quick requests itself (a chunk
from a local store: a stat and a read, cheaper than any hand-off between threads on a few cores)
and gives the others to a bounded pool of worker threads, whose answers it writes. A request that
streams its answer while it reads its body (remotesync's POST) takes its connection to a thread of
its own. Bodies are received by the loop before a handler runs, so a client that never finishes
an upload holds no thread.

Everything a client can make the server hold is bounded: connections (503 beyond the cap),
requests with a body in flight and the bytes they declare (503 beyond), worker threads; per
connection, no buffer while idle, 64 KiB of request head and 100 headers (431), a head complete
within 30 s and no silence over 30 s inside a request (408), an idle connection closed after
120 s, an answer the client does not read dropped after 30 s. A failure inside a connection, a bug
in a handler included, costs that connection (or a 500 for that request), never the server.
Running out of file descriptors pauses accepting until connections close; it does not stop the
server. `stop()` stops accepting and lets requests in flight finish, within `stop_grace`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import TextIO

import httptools

from ..platform import unsent_bytes
from .metrics import Metrics

log = logging.getLogger(__name__)  # (the CLI shows these lines on stderr)

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
PARSE_SLICE = 8 * 1024  # received bytes are parsed this much at a time (see Connection.take)
RECV_SIZE = 64 * 1024
HIGH_WATER = 1 << 20  # stop reading a connection while this much of its answers waits to be sent
SWEEP = 1.0  # seconds between checks for timed-out connections
DEFAULT_BODY_LIMIT = 1 << 20
NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
Part = bytes | bytearray | memoryview
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "PUT", "POST")}


@dataclass
class Limits:
    """What one server may hold at once, and how long a client may keep it waiting."""

    connections: int = 10_000
    uploads: int = 256  # requests with a body (or streaming) in flight
    upload_bytes: int = 1 << 30  # declared body bytes of those
    workers: int = 32
    head_timeout: float = 30.0  # a request head in all; silence inside a request; an unread answer
    idle_timeout: float = 120.0
    stop_grace: float = 30.0


class Refused(Exception):
    """A request answered with an error status before any handler ran; the connection ends once
    the requests received in full before it are answered."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.req: Request | None = None  # the request refused, when its head was complete


@dataclass
class Service:
    """What a server does with requests. `handle` answers one (through the Request's reply
    methods, exactly once). `quick` says a request is answered on the loop's thread (it must not
    block), `streams` that it takes its connection to a thread of its own and reads its body
    while answering, `body_limit` the largest body accepted (413 beyond)."""

    name: str
    handle: Callable[[Request], None]
    quick: Callable[[Request], bool] = lambda req: False
    streams: Callable[[Request], bool] = lambda req: False
    body_limit: Callable[[Request], int] = lambda req: DEFAULT_BODY_LIMIT


class Request:
    """One request: method, target, headers (names lower-case), and the ways to answer it."""

    __slots__ = ("_body", "_conn", "_continue", "_counted", "_declared", "_done", "_size", "body_read",
                 "client", "has_body", "headers", "keep_alive", "method", "mode", "target", "version")

    def __init__(self, conn: Connection, method: str = "GET", target: str = "-", version: str = "1.1",
                 headers: dict[str, str] | None = None, keep_alive: bool = True):
        self._conn = conn
        self.client = conn.client
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers if headers is not None else {}
        self.keep_alive = keep_alive
        self.has_body = self.headers.get("content-length", "0") != "0" or "transfer-encoding" in self.headers
        self.mode = "loop"  # "loop": on the loop; "worker": in the pool; "stream": own thread; "ignored"
        self.body_read = False
        self._body = bytearray()  # one buffer: a body in small chunks costs its bytes, not an object each
        self._continue = False  # owes `100 Continue` once the answers before it are out
        self._size = 0
        self._counted = False  # counted against the upload limits (released once answered)
        self._declared = 0  # the bytes counted
        self._done = False  # the whole body has arrived

    @property
    def path(self) -> str:
        return self.target

    def read_body(self, limit: int) -> bytes | None:
        """The whole body; None after answering 413 when it is longer than `limit` (which the
        loop has already checked against the service's body limit)."""
        self.body_read = True
        if self.mode == "stream":
            for _ in self.body_pieces():
                if self._size > limit:
                    break
        if self._size > limit:
            self.keep_alive = False
            self._conn.reply(self, 413, b"body too large\n")
            return None
        return bytes(self._body)

    def body_pieces(self) -> Iterator[bytes]:
        """The body as it arrives (a streaming request's; chunked framing removed); what arrived
        is kept for read_body too."""
        self.body_read = True
        i = 0
        while True:
            if i < len(self._body):
                piece = bytes(self._body[i:])
                i += len(piece)
                yield piece
            elif self._done or self.mode != "stream" or not self._conn.receive_blocking():
                return


class Connection:
    """One client connection. The loop thread owns it, except while a streaming request has it."""

    __slots__ = ("_head_bytes", "_head_parsed", "_headers", "_server", "_stalled", "_url",
                 "busy", "client", "closing", "events", "handshaking", "last_active", "out", "out_bytes",
                 "parser", "ready", "refusal", "req", "req_since", "sock", "streaming", "tls", "unsent",
                 "write_since")

    def __init__(self, server: Http11Server, sock: socket.socket, client: tuple[str, int], tls: bool):
        self._server = server
        self.sock = sock
        self.client = (str(client[0]), int(client[1]))
        self.tls = tls
        self.handshaking = tls
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # being received, its head complete
        self.req_since: float | None = None  # when the request being received began (None: none is)
        self.ready: collections.deque[Request] = collections.deque()  # received, not yet answered
        self.busy = False  # a request is with a worker (or streaming)
        self.streaming: Request | None = None  # to be handed to its own thread after those before it
        self.refusal: Refused | None = None  # to be answered after those before it; then the end
        self.out: collections.deque[Part] = collections.deque()
        self.out_bytes = 0
        self.write_since: float | None = None  # when an answer was last taken by the socket, if one waits
        self.unsent = -1  # bytes in the kernel's send queue at the last sweep (-1: not looked)
        self.closing = False  # close once the answers queued are sent
        self.events = 0
        self.last_active = time.monotonic()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_parsed = 0
        self._stalled = 0  # bytes received inside a request's body that brought no body byte

    # ---- parser callbacks (httptools) ----------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        if self.req_since is None:  # a request begins (its URL is the first thing parsed)
            self.req_since = time.monotonic()
            self._url = url
            self._headers = []
            self._head_parsed = len(url)
            self._head_bytes = 0
            return
        self._url += url
        self._parsed_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(self._headers) > MAX_HEADERS:
            raise Refused(431, "too many headers")
        self._parsed_head(len(name) + len(value) + 4)

    def _parsed_head(self, n: int) -> None:
        self._head_parsed += n
        if self._head_parsed > MAX_HEAD:
            raise Refused(431, "request head too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        headers = {}
        for name, value in self._headers:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1").rstrip()
        req = self.req = Request(self, _METHODS.get(method) or method.decode("latin-1"),
                                 self._url.decode("latin-1"), parser.get_http_version(), headers,
                                 parser.should_keep_alive())
        self._head_bytes = 0
        self._stalled = 0
        if parser.should_upgrade() and (req.has_body or req.method == "CONNECT"):
            raise Refused(400, "protocol upgrades are not supported")  # an offer without a body is ignored
        if self.streaming is not None:  # after a streaming request, which ends the connection
            req.mode = "ignored"
            return
        self._server.admit(self, req)

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is None or req.mode == "ignored":
            return
        req._size += len(body)
        if req._size > req._declared:  # chunked: counted as it arrives
            self._server.grow_upload(req, len(body))
        req._body += body

    def on_message_complete(self) -> None:
        req = self.req
        if req is None:
            return
        req._done = True
        self.req = None
        self.req_since = None
        self._head_bytes = 0
        if req.mode not in ("stream", "ignored"):
            self.ready.append(req)

    # ---- input ---------------------------------------------------------------------------------
    def head_pending(self) -> bool:
        """A request has begun and its head is not complete yet."""
        return self.req_since is not None and self.req is None

    def take(self, data: bytes | memoryview) -> None:
        """Parse received bytes; protocol errors become Refused. What the parser can be made to
        hold is bounded: a request head that goes on past MAX_HEAD, and bytes inside a request
        that bring no body (a trailer or chunk framing without end) past as much, are refused
        (431). Bytes are parsed in slices of PARSE_SLICE, so what a pending head is charged for
        is its own bytes and at most one slice of the requests before it. An upgrade offer (h2c,
        websocket) is declined by answering over HTTP/1.1 (RFC 9110 7.8): parsing goes on."""
        n = len(data)
        if n > PARSE_SLICE:
            for start in range(0, n, PARSE_SLICE):
                self.take(data[start:start + PARSE_SLICE])
            return
        req = self.req
        size = req._size if req is not None else 0
        while True:
            try:
                self.parser.feed_data(data)
                break
            except httptools.HttpParserCallbackError as e:
                if isinstance(e.__context__, (Refused, OSError, ssl.SSLError)):
                    raise e.__context__ from None
                raise
            except httptools.HttpParserUpgrade as e:  # declined: what follows is HTTP/1.1 again
                self.parser = httptools.HttpRequestParser(self)
                data = data[int(e.args[0]):]
                if not data:
                    return
            except httptools.HttpParserError as e:
                raise Refused(400, f"bad request: {e}") from None
        if self.req_since is None:
            return
        if self.req is None:  # a head not complete yet
            self._head_bytes += n
            if self._head_bytes > MAX_HEAD:
                raise Refused(431, "request head too large")
        elif req is not None and self.req is req and req._size == size:
            self._stalled += n
            if self._stalled > MAX_HEAD:
                raise Refused(431, "request trailer or chunk framing too large")
        else:
            self._stalled = 0

    def receive_blocking(self) -> bool:
        """Streaming mode: receive and parse more of the body (blocking); False at its end."""
        req = self.req
        if req is None or req._done:
            return False
        data = self.sock.recv(RECV_SIZE)
        if not data:
            return False
        self.take(data)
        return True

    # ---- answers -------------------------------------------------------------------------------
    def head(self, req: Request, status: int, length: int | None, content_type: str) -> bytes:
        """A response head; length None = a body ended by closing the connection."""
        lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, '')}", "Server: pydesync",
                 f"Content-Type: {content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if status == 503:
            lines.append("Retry-After: 1")
        if not req.keep_alive or length is None or self._server.stopping:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def reply(self, req: Request, status: int, body: bytes | bytearray | memoryview = b"",
              content_type: str = "text/plain; charset=utf-8") -> None:
        """Answer `req` (once)."""
        head = self.head(req, status, len(body), content_type)
        parts: list[Part] = [head] if req.method == "HEAD" or not body else [head, body]
        self._server.log_request(self, req, status, len(body) if req.method != "HEAD" else 0)
        if req.mode == "stream":
            for part in parts:
                self.sock.sendall(part)
        else:
            self._server.answered(self, req, parts)

    def reply_file(self, req: Request, fd: int, size: int,
                   content_type: str = "application/octet-stream") -> None:
        """200 with a file's bytes (for HEAD, its length only)."""
        if req.method != "HEAD":
            self.reply(req, 200, os.pread(fd, size, 0), content_type)
            return
        self._server.log_request(self, req, 200, 0)
        head = self.head(req, 200, size, content_type)
        if req.mode == "stream":
            self.sock.sendall(head)
        else:
            self._server.answered(self, req, [head])

    def reply_stream(self, req: Request,
                     content_type: str = "application/octet-stream") -> Callable[[bytes], None]:
        """200 with a body of unknown length, ended by closing the connection (streaming requests
        only); returns the function that writes the body."""
        if req.mode != "stream":
            raise RuntimeError("reply_stream needs a streaming request (Service.streams)")
        req.keep_alive = False
        self.sock.sendall(self.head(req, 200, None, content_type))
        self._server.log_request(self, req, 200, None)
        sent = self._server.metrics.bytes_out

        def write(data: bytes) -> None:
            self.sock.sendall(data)
            sent(len(data))
        return write

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Http11Server:
    """The listeners of one service and the loop that serves them (see the module docstring)."""

    def __init__(self, addresses: list[tuple[str, int]], service: Service,
                 context: ssl.SSLContext | None = None, log: TextIO | None = None,
                 limits: Limits | None = None, metrics: Metrics | None = None, log_format: str = "desync"):
        self.service = service
        self.context = context
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics(None)
        self._log = log
        self._log_format = log_format
        self._log_lock = threading.Lock()
        self.listeners: list[socket.socket] = []
        try:
            for address in addresses:
                self.listeners.append(_listen(address))
        except OSError:
            for sock in self.listeners:
                sock.close()
            raise
        self.server_addresses = [s.getsockname()[:2] for s in self.listeners]
        self.selector = selectors.DefaultSelector()
        self._buffer = memoryview(bytearray(RECV_SIZE))  # every read lands here: the loop is one thread
        self.conns: set[Connection] = set()
        self.uploads = 0
        self.upload_bytes = 0
        self._counts = threading.Lock()  # upload counts change on the loop and on streaming threads
        self.served = 0
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix=f"{service.name}-worker")
        self._posted: collections.deque[tuple[Connection, Request, list[Part]]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._streams: set[threading.Thread] = set()
        self._adoptions: collections.deque[tuple[socket.socket, tuple[str, int]]] = collections.deque()
        self._stopping = False  # stop() was called (a flag: set once, read on the loop)
        self._stop_now = False
        self._stopped = threading.Event()
        self._accept_paused_until: float | None = None
        self._accept_pause = 0.05
        self._warned_accept = -1e9
        self._loop_thread: threading.Thread | None = None
        self._loop_ident = -1

    @property
    def server_address(self) -> tuple[str, int]:
        return self.server_addresses[0]

    @property
    def tls(self) -> bool:
        return self.context is not None

    @property
    def stopping(self) -> bool:
        """stop() was called: answers end their connection."""
        return self._stopping

    def urls(self) -> list[str]:
        """Where it listens, as URLs (for the start-up line)."""
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://[{h}]:{p}" if ":" in h else f"{scheme}://{h}:{p}"
                for h, p in self.server_addresses]

    # ---- running -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the loop on this thread until stop() has finished (or an error ends it)."""
        self._loop_thread = threading.current_thread()
        self._loop_ident = threading.get_ident()
        try:
            self._run()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            for conn in list(self.conns):
                self._drop(conn)
            for sock in self.listeners:
                with contextlib.suppress(OSError):
                    sock.close()
            self.selector.close()
            self._stopped.set()

    def stop(self, now: bool = False) -> None:
        """Stop accepting; requests in flight finish (within stop_grace, or not at all with `now`);
        then serve_forever returns. Safe from signal handlers and other threads."""
        self._stop_now = self._stop_now or now
        self._stopping = True
        self._wake()

    def shutdown(self) -> None:
        """stop() and wait for the loop to end."""
        self.stop()
        if self._loop_thread is not None:
            self._stopped.wait()

    def adopt(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Serve a connection made elsewhere (a socket pair in tests and fuzzing); any thread."""
        self._adoptions.append((sock, address))
        self._wake()

    def server_close(self) -> None:
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()

    def _run(self) -> None:
        sel = self.selector
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen_on()
        next_sweep = time.monotonic() + SWEEP
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping and stop_deadline is None:
                stop_deadline = now + self.limits.stop_grace
                self._begin_stop()
            if stop_deadline is not None and ((not self.conns and not self._streams) or self._stop_now
                                              or now >= stop_deadline):
                return
            timeout = max(0.0, next_sweep - now)
            if self._accept_paused_until is not None:
                timeout = min(timeout, max(0.0, self._accept_paused_until - now))
            for key, events in sel.select(timeout):
                data = key.data
                if data == "wake":
                    self._drain_wake()
                elif data == "listen":
                    self._accept(key.fileobj)  # type: ignore[arg-type]  # (the listening socket registered it)
                else:
                    self._event(data, events)
            now = time.monotonic()
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._accept_paused_until = None
                if not self._stopping:
                    self._listen_on()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP

    def _listen_on(self) -> None:
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.register(sock, selectors.EVENT_READ, "listen")

    def _listen_off(self) -> None:
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)

    def _begin_stop(self) -> None:
        """Stop accepting and close connections with nothing in flight; the others close once
        their last answer is out (answers made from now on say `Connection: close`)."""
        self._listen_off()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()
        for conn in list(self.conns):
            if self._idle(conn):
                self._drop(conn)

    # ---- accepting -----------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in NO_DESCRIPTORS:
                    self._pause_accepting(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client is gone already
                raise
            self._accept_pause = 0.05
            if len(self.conns) >= self.limits.connections:
                self.metrics.refused("connections")
                _refuse_at_once(sock, b"too many connections\n")
                continue
            self._adopt(sock, address)

    def _pause_accepting(self, error: OSError) -> None:
        """Out of descriptors (or memory): stop accepting for a moment, keep serving what is
        open; the backoff grows while it lasts."""
        now = time.monotonic()
        if now - self._warned_accept > 60:  # once a minute at most, however long it lasts
            self._warned_accept = now
            _warn(f"{self.service.name}: cannot accept connections ({os.strerror(error.errno or 0)}; "
                  f"{len(self.conns)} open); accepting again as they close")
        self.metrics.refused("descriptors")
        self._listen_off()
        self._accept_paused_until = time.monotonic() + self._accept_pause
        self._accept_pause = min(1.0, self._accept_pause * 2)

    def _adopt(self, sock: socket.socket, address: tuple) -> None:
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            return
        conn = Connection(self, sock, address, self.context is not None)
        self.conns.add(conn)
        self.metrics.connections(len(self.conns))
        if conn.handshaking:
            self._handshake(conn)
        else:
            self._update(conn)

    # ---- connection events ---------------------------------------------------------------------
    def _event(self, conn: Connection, events: int) -> None:
        if conn not in self.conns:
            return  # dropped earlier in this round
        try:
            if conn.handshaking:
                self._handshake(conn)
                return
            if events & selectors.EVENT_WRITE:
                if conn.busy:
                    self._flush(conn)
                else:
                    self._answer_ready(conn)  # and what was held back while answers were backed up
            if events & selectors.EVENT_READ and conn in self.conns:
                self._read(conn)
        except Refused as e:
            self._refuse(conn, e)  # never raises
        except (OSError, ssl.SSLError):
            self._drop(conn)
        except Exception as e:  # a bug costs this connection, not the server
            _warn(f"{self.service.name}: internal error on a connection from {conn.client[0]}: {e!r}")
            self._drop(conn)

    def _guarded(self, conn: Connection, step: Callable[..., None], *args: object) -> None:
        """Run one step of a connection's life on the loop: a refused request is answered, a
        failure of the connection ends it, and a bug costs this connection, not the server."""
        try:
            try:
                step(*args)
            except Refused as e:
                self._refuse(conn, e)
        except (OSError, ssl.SSLError):
            self._drop(conn)
        except Exception as e:
            _warn(f"{self.service.name}: internal error on a connection from {conn.client[0]}: {e!r}")
            self._drop(conn)

    def _handshake(self, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]  # (an SSLSocket when tls)
        except ssl.SSLWantReadError:
            self._set_events(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError):
            self._drop(conn)
            return
        conn.handshaking = False
        conn.last_active = time.monotonic()
        self._update(conn)

    def _read(self, conn: Connection) -> None:
        """Receive what has arrived, parse it, and answer the requests it completes."""
        buffer = self._buffer
        while True:
            try:
                n = conn.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not n:
                self._peer_closed(conn)
                return
            conn.last_active = time.monotonic()
            if self.metrics.enabled:
                self.metrics.bytes_in(n)
            conn.take(buffer[:n])
            if conn not in self.conns or conn.busy or conn.streaming is not None:
                break  # a streaming request's body is read by its own thread
            if not conn.tls or not conn.sock.pending():  # type: ignore[attr-defined]  # (an SSLSocket when tls)
                break
        self._answer_ready(conn)

    def _peer_closed(self, conn: Connection) -> None:
        """The client closed its side: answer what it asked in full, then close."""
        if conn.req_since is not None or self._idle(conn):
            self._drop(conn)  # nothing to answer, or a request cut short
            return
        conn.closing = True
        self._answer_ready(conn)

    def _answer_ready(self, conn: Connection) -> None:
        """Answer received requests in order: quick ones here, others by a worker (one at a
        time per connection, so answers keep their order). Answers waiting to be sent are kept
        under HIGH_WATER: past it, the rest waits until the client has read them."""
        while conn.ready and not conn.busy and conn in self.conns:
            if conn.out_bytes >= HIGH_WATER:
                self._send_out(conn)
                if conn.out_bytes >= HIGH_WATER:
                    break
            req = conn.ready.popleft()
            if self._stopping:
                req.keep_alive = False
            if not req.has_body and self.service.quick(req):
                self._run_handler(conn, req)
            else:
                req.mode = "worker"
                conn.busy = True
                self._pool.submit(self._work, conn, req)
        if (conn.streaming is not None or conn.refusal is not None or conn.req is not None) \
                and not conn.busy and not conn.ready and conn in self.conns:
            self._after_answers(conn)
        if conn in self.conns:
            self._flush(conn)

    def _after_answers(self, conn: Connection) -> None:
        """The requests received in full are answered: what comes next in the connection's order.
        A streaming request takes the connection (once the answers are out); a refusal is answered
        (unless an answer has ended the connection); a request receiving its body gets its
        `100 Continue`."""
        if conn.streaming is not None:
            self._send_out(conn)
            if not conn.out:
                self._hand_over(conn, conn.streaming)
        elif conn.refusal is not None:
            e, conn.refusal = conn.refusal, None
            if not conn.closing:
                req = e.req or Request(conn)
                req.keep_alive = False
                req.mode = "loop"
                conn.reply(req, e.status, f"{e}\n".encode())
        elif conn.req is not None and conn.req._continue:
            conn.req._continue = False
            conn.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.out_bytes += 25
            if conn.write_since is None:
                conn.write_since = time.monotonic()

    def _run_handler(self, conn: Connection, req: Request) -> None:
        """Run the service on one request; a handler that raises (a bug) answers 500."""
        try:
            self.service.handle(req)
        except (OSError, ssl.SSLError, Refused):
            if req.mode == "stream":
                raise
            req.keep_alive = False
            conn.reply(req, 500, b"internal server error\n")
        except Exception as e:
            _warn(f"{self.service.name}: {req.method} {req.target}: internal error: {e!r}")
            req.keep_alive = False
            if req.mode == "stream":
                raise
            conn.reply(req, 500, b"internal server error\n")

    def _work(self, conn: Connection, req: Request) -> None:
        """A worker thread: run the handler; its answer is posted to the loop."""
        try:
            self._run_handler(conn, req)
        except BaseException as e:  # the loop must hear of it, or the connection would hang
            _warn(f"{self.service.name}: {req.method} {req.target}: {e!r}")
            req.keep_alive = False
            self.answered(conn, req, [])

    def admit(self, conn: Connection, req: Request) -> None:
        """A request head is complete (loop thread, from the parser): refuse it, or count its
        body against the upload limits, send `100 Continue`, or hand a streaming request its
        connection."""
        if self._stopping:
            req.keep_alive = False
        streams = self.service.streams(req)
        if streams or req.has_body:
            length = req.headers.get("content-length")
            declared = int(length) if length is not None else 0  # llhttp has checked the digits
            if declared > self.service.body_limit(req):
                self.metrics.refused("too large")
                raise Refused(413, "body too large")
            with self._counts:
                if self.uploads >= self.limits.uploads or \
                        self.upload_bytes + declared > self.limits.upload_bytes:
                    self.metrics.refused("uploads")
                    raise Refused(503, "too many uploads in progress, try again later")
                self.uploads += 1
                self.upload_bytes += declared
            req._counted = True
            req._declared = declared
            # sent once the answers before it are (a pipelining client reads answers in order)
            req._continue = req.headers.get("expect", "").lower() == "100-continue" and not streams
        if streams:  # handed over once the answers before it are out
            req.mode = "stream"
            conn.streaming = req

    def grow_upload(self, req: Request, n: int) -> None:
        """Bytes of a body beyond what it declared (chunked): counted, and refused past the limits."""
        if req._size > self.service.body_limit(req):
            raise Refused(413, "body too large")
        with self._counts:
            if self.upload_bytes + n > self.limits.upload_bytes:
                raise Refused(503, "too many uploads in progress, try again later")
            self.upload_bytes += n
        req._declared += n

    def _release_upload(self, req: Request) -> None:
        """A request with a body is answered (or gone): its share of the upload limits is free."""
        if not req._counted:
            return
        with self._counts:
            self.uploads -= 1
            self.upload_bytes -= req._declared
        req._counted = False
        req._declared = 0

    # ---- streaming requests --------------------------------------------------------------------
    def _hand_over(self, conn: Connection, req: Request) -> None:
        """From now on `req` (its head complete, maybe some of its body parsed) and its connection
        belong to a thread of its own."""
        conn.streaming = None
        conn.busy = True
        self.conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.events = 0
        thread = threading.Thread(target=self._stream, args=(conn, req), daemon=True,
                                  name=f"{self.service.name}-stream")
        self._streams.add(thread)
        thread.start()

    def _stream(self, conn: Connection, req: Request) -> None:
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(self.limits.head_timeout)
            self._run_handler(conn, req)
        except (OSError, ssl.SSLError, Refused):
            pass
        except Exception as e:
            _warn(f"{self.service.name}: {req.method} {req.target}: internal error: {e!r}")
        finally:
            conn.close()
            self._release_upload(req)
            self._streams.discard(threading.current_thread())
            self.metrics.connections(len(self.conns))
            self._wake()

    # ---- answers -------------------------------------------------------------------------------
    def answered(self, conn: Connection, req: Request, parts: list[Part]) -> None:
        """A handler's answer: queued here on the loop thread, posted to it from a worker."""
        if threading.get_ident() == self._loop_ident:
            self._queue_answer(conn, req, parts)
            return
        self._posted.append((conn, req, parts))
        self._wake()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while self._adoptions:
            self._adopt(*self._adoptions.popleft())
        while self._posted:
            conn, req, parts = self._posted.popleft()
            conn.busy = False
            if conn not in self.conns:
                self._release_upload(req)
                continue
            self._guarded(conn, self._deliver, conn, req, parts)

    def _deliver(self, conn: Connection, req: Request, parts: list[Part]) -> None:
        """A worker's answer: queued, then the next request received meanwhile (this flushes)."""
        self._queue_answer(conn, req, parts)
        self._answer_ready(conn)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _queue_answer(self, conn: Connection, req: Request, parts: list[Part]) -> None:
        if req._counted:
            self._release_upload(req)
        self.served += 1
        if req.has_body and not req._done:
            req.keep_alive = False  # the rest of an unread body would be taken for the next request
        for part in parts:
            if len(part):
                conn.out.append(part)
                conn.out_bytes += len(part)
        if conn.out_bytes and conn.write_since is None:
            conn.write_since = time.monotonic()
        if not req.keep_alive or self._stopping:
            conn.closing = True
            self._forget_pending(conn)

    def _forget_pending(self, conn: Connection) -> None:
        """Requests that will not be answered (the connection ends before them): their share of
        the upload limits is given back."""
        for pending in conn.ready:
            self._release_upload(pending)
        conn.ready.clear()
        for current in (conn.req, conn.streaming):
            if current is not None:
                self._release_upload(current)
        conn.req = None
        conn.streaming = None
        conn.refusal = None

    def _flush(self, conn: Connection) -> None:
        """Send queued answers without blocking; then close (if closing and done) or wait for
        what the connection needs next."""
        self._send_out(conn)
        if not conn.out:
            if conn.closing and not conn.busy and not conn.ready:
                self._drop(conn)
                return
            conn.last_active = time.monotonic()
        self._update(conn)

    def _send_out(self, conn: Connection) -> None:
        """Send as much of the queued answers as the socket takes now."""
        out = conn.out
        sock = conn.sock
        counting = self.metrics.enabled
        while out:
            try:
                if conn.tls:
                    sent = sock.send(out[0])
                else:
                    sent = sock.sendmsg(out if len(out) <= 64 else list(itertools.islice(out, 64)))
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            if counting:
                self.metrics.bytes_out(sent)
            conn.out_bytes -= sent
            while sent:
                first = out[0]
                if sent >= len(first):
                    sent -= len(first)
                    out.popleft()
                else:
                    out[0] = memoryview(first)[sent:]
                    sent = 0
            conn.write_since = time.monotonic() if out else None

    def _refuse(self, conn: Connection, e: Refused) -> None:
        """A request is refused: it is answered after the requests received in full before it,
        and then the connection ends (nothing after it is read). Never raises."""
        if conn not in self.conns:
            return
        req = conn.req
        if req is not None:  # refused before its body was complete: nothing of it will be used
            self._release_upload(req)
            if conn.streaming is req:
                conn.streaming = None
            e.req = req
        conn.req = None
        conn.req_since = None
        if conn.refusal is None:
            conn.refusal = e
        if conn.busy:
            return  # answered once the worker's answer is in
        self._guarded(conn, self._answer_ready, conn)

    # ---- bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def _idle(conn: Connection) -> bool:
        return not conn.busy and not conn.out and not conn.ready and conn.req_since is None \
            and conn.streaming is None and conn.refusal is None

    def _update(self, conn: Connection) -> None:
        """Wait for what the connection needs next: its answers to drain, or more requests
        (not while one is with a worker, answers back up, or it is closing)."""
        if conn not in self.conns or conn.handshaking:
            return
        events = 0
        if conn.out or (conn.ready and not conn.busy):  # answers to send, or held back to answer
            events |= selectors.EVENT_WRITE
        if not conn.busy and not conn.closing and not conn.ready and conn.out_bytes < HIGH_WATER \
                and conn.refusal is None and conn.streaming is None:
            events |= selectors.EVENT_READ
            if not conn.events & selectors.EVENT_READ and conn.req_since is not None:
                # reading again after the server held back: the client's time runs from now
                conn.last_active = time.monotonic()
                if conn.head_pending():
                    conn.req_since = conn.last_active
        self._set_events(conn, events)

    def _set_events(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        sel = self.selector
        if conn.events == 0:
            sel.register(conn.sock, events, conn)
        elif events == 0:
            sel.unregister(conn.sock)
        else:
            sel.modify(conn.sock, events, conn)
        conn.events = events

    def _drop(self, conn: Connection) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            if conn.events:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(conn.sock)
                conn.events = 0
            self.metrics.connections(len(self.conns))
        self._forget_pending(conn)
        conn.out.clear()
        conn.close()

    def _sweep(self, now: float) -> None:
        """End connections that keep the server waiting: a TLS handshake or a request head not
        done within head_timeout, silence inside a request while the server reads, an answer the
        client does not take for as long, or idle past idle_timeout."""
        limits = self.limits
        for conn in list(self.conns):
            if conn.busy:
                continue
            if conn.handshaking:
                if now - conn.last_active > limits.head_timeout:
                    self._drop(conn)
            elif conn.write_since is not None:
                if now - conn.write_since > SWEEP and _reading_progressed(conn):
                    conn.write_since = now
                if now - conn.write_since > limits.head_timeout:
                    self._drop(conn)
            elif conn.req_since is not None and conn.events & selectors.EVENT_READ and (
                    now - conn.last_active > limits.head_timeout
                    or (conn.head_pending() and now - conn.req_since > limits.head_timeout)):
                self.metrics.refused("timeout")
                self._refuse(conn, Refused(408, "request timeout"))
            elif self._idle(conn) and now - conn.last_active > limits.idle_timeout:
                self._drop(conn)

    def log_request(self, conn: Connection, req: Request, status: int, size: int | None) -> None:
        """One access log line, and the request counted in the metrics."""
        if self._log is None:
            if self.metrics.enabled:
                self.metrics.request(req.method, status)
            return
        self.metrics.request(req.method, status)
        line = access_line(self._log_format, conn.client, req, status, size)
        with self._log_lock, contextlib.suppress(OSError, ValueError):
            self._log.write(line)
            self._log.flush()


def access_line(kind: str, client: tuple[str, int], req: Request, status: int, size: int | None) -> str:
    """desync's request log line, or the Common Log Format (`--log-format common`)."""
    if kind == "common":
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        version = f"HTTP/{req.version}"
        return f'{client[0]} - - [{stamp}] "{req.method} {req.target} {version}" {status} {size or "-"}\n'
    stamp = time.strftime("%Y/%m/%d %H:%M:%S")
    return (f"{stamp} Client: {client[0]}:{client[1]}, Request: {req.method} {req.target}, "
            f"Response: {status}\n")


def _listen(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _reading_progressed(conn: Connection) -> bool:
    """Whether the client has taken bytes from the kernel's send queue since the last look. A
    large send buffer only turns writable again once half of it has drained: a slow reader that
    reads all along is not one that stopped (Linux's SIOCOUTQ; elsewhere: no)."""
    try:
        unsent = unsent_bytes(conn.sock.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    progressed = 0 <= unsent < conn.unsent
    conn.unsent = unsent
    return progressed


def _refuse_at_once(sock: socket.socket, message: bytes) -> None:
    """503 to a connection over the cap, best effort and without blocking, then close it."""
    head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: pydesync\r\nRetry-After: 1\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(message)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(head + message)
    sock.close()


def _warn(message: str) -> None:
    log.warning(message)
