"""What both HTTP servers share: listening (several addresses, TLS, mutual TLS), the
Authorization check, the access log, and keep-alive request handling in threads.
"""

from __future__ import annotations

import hmac
import http.server
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from ..errors import UsageError

MAX_BODY = 128 * 1024 * 1024 + 1024 * 1024  # a chunk (128 MiB at most) plus room for its encoding


@dataclass
class ServerOptions:
    listen: list[str]
    cert: str | None = None
    key: str | None = None
    mutual_tls: bool = False
    client_ca: str | None = None
    authorization: str | None = None
    log: TextIO | None = None

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise UsageError("--key and --cert options need to be provided together")
        if self.mutual_tls and not self.cert:
            raise UsageError("--mutual-tls requires --key and --cert")
        if self.mutual_tls and not self.client_ca:
            raise UsageError("--mutual-tls requires --client-ca")
        if self.client_ca and not self.mutual_tls:
            raise UsageError("--client-ca requires --mutual-tls")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.mutual_tls:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"cannot load TLS certificates: {e}") from None
        return ctx


def parse_listen(address: str) -> tuple[str, int]:
    """`host:port`, `:port`, `[v6]:port`; `:http`/`:https` name the default ports."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ports = {"http": 80, "https": 443}
    try:
        number = ports[port] if port in ports else int(port)
    except ValueError:
        raise UsageError(f"invalid listen address '{address}'") from None
    return host, number


class Handler(http.server.BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 handler; subclasses implement do_GET/do_HEAD/do_PUT via `app`."""

    protocol_version = "HTTP/1.1"
    server_version = "pydesync"
    disable_nagle_algorithm = True  # small responses must not wait for the client's delayed ACK
    app: Callable[[Handler], None]
    options: ServerOptions
    log_lock = threading.Lock()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def authorized(self) -> bool:
        expected = self.options.authorization
        if not expected:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> None:
        """Status, headers and body in one write (one TCP segment train, no Nagle stall)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD" and body:
            self._headers_buffer.append(body)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def read_body(self) -> bytes | None:
        """The request body, or None after answering 411/413 when it is missing or too large."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.reply(411, b"Content-Length required\n")
            return None
        size = int(length)
        if size > MAX_BODY:
            self.reply(413, b"body too large\n")
            self.close_connection = True
            return None
        return self.rfile.read(size)

    def dispatch(self) -> None:
        if not self.authorized():
            self.reply(401, b"Unauthorized\n")
            return
        type(self).app(self)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log = self.options.log
        if log is None:
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        with self.log_lock:
            log.write(f"{stamp} Client: {self.client_address[0]}:{self.client_address[1]}, "
                      f"Request: {self.command} {self.path}, Response: {code}\n")
            log.flush()

    def log_message(self, format: str, *args: object) -> None:
        """Errors from http.server go to stderr only when logging was asked for."""
        if self.options.log is not None:
            sys.stderr.write(format % args + "\n")


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_servers(handler: type[Handler], options: ServerOptions) -> list[http.server.HTTPServer]:
    """Bind every listen address (one thread per connection on each)."""
    options.validate()
    context = options.ssl_context()
    servers = []
    for address in options.listen:
        host, port = parse_listen(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (_ThreadingServer,), {"address_family": family})
        try:
            server = server_class((host, port), handler)
        except OSError as e:
            raise UsageError(f"cannot listen on {address}: {e.strerror}") from None
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        servers.append(server)
    return servers


def serve_forever(servers: list[http.server.HTTPServer]) -> None:
    """Serve on every address until interrupted; the first listener failure ends all."""
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        while all(t.is_alive() for t in threads):
            time.sleep(0.5)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
