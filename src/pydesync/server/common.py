"""What both HTTP servers share: listening (several addresses, TLS, mutual TLS), the
Authorization check, the access log, and the request object handlers see.
"""

from __future__ import annotations

import hmac
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from ..codec import MAX_ENCODED_CHUNK
from ..errors import UsageError
from .http11 import Http11Server, Request

MAX_BODY = MAX_ENCODED_CHUNK  # an upload: a chunk (128 MiB at most) plus room for its encoding


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


def target_path(target: str) -> str | None:
    """The path of a request target, still percent-encoded, without query or fragment; None if it
    is not one. Origin form ("/a/b?q") is split by hand: urlsplit would take "//x/y" for a host
    and raise on a stray "[". Absolute form ("http://h/a", as proxies send) is parsed."""
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    try:
        parts = urlsplit(target)
    except ValueError:
        return None
    return parts.path if parts.scheme in ("http", "https") and parts.path.startswith("/") else None


class Exchange:
    """One request as the handlers see it: method, path, headers, and ways to answer.
    `target_path` is the target's path (see target_path), checked before any handler runs."""

    __slots__ = ("req", "target_path")

    def __init__(self, req: Request, path: str = "/"):
        self.req = req
        self.target_path = path

    @property
    def command(self) -> str:
        return self.req.method

    @property
    def path(self) -> str:
        return self.req.target

    def header(self, name: str) -> str | None:
        return self.req.headers.get(name.lower())

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> None:
        self.req._conn.reply(self.req, status, body, content_type)

    def reply_file(self, fd: int, size: int) -> None:
        self.req._conn.reply_file(self.req, fd, size)

    def read_body(self, limit: int = MAX_BODY) -> bytes | None:
        return self.req.read_body(limit)

    def stream(self, content_type: str = "application/octet-stream") -> Callable[[bytes], None]:
        """Answer 200 with a body ended by closing the connection; returns its writer."""
        return self.req._conn.reply_stream(self.req, content_type)


class App:
    """Request logic for one server kind; `servers()` binds it to the listening sockets.

    Both servers speak GET, HEAD and PUT only; anything else is 405 before the
    subclass sees it.
    """

    def servers(self, options: ServerOptions) -> list[Http11Server]:
        return make_servers(self._dispatch, options, self.quick)

    def quick(self, req: Request) -> bool:
        """Whether a request (without a body) can be answered without blocking for long, so
        on the event loop's thread (see Http11Server). Default: no."""
        return False

    def _dispatch(self, req: Exchange) -> None:
        if req.command not in ("GET", "HEAD", "PUT"):
            req.reply(405, b"only GET, PUT and HEAD are supported\n")
            return
        self.handle(req)

    def handle(self, req: Exchange) -> None:
        raise NotImplementedError


def make_app(handle: Callable[[Exchange], None], options: ServerOptions) -> Callable[[Request], None]:
    """The request entry point: the Authorization check, then the handler."""
    expected = options.authorization.encode() if options.authorization else None

    def app(req: Request) -> None:
        path = target_path(req.target)
        ex = Exchange(req, path or "/")
        if path is None:
            ex.reply(400, b"invalid request target\n")
            return
        if expected is not None:
            given = (req.headers.get("authorization") or "").encode()
            if not hmac.compare_digest(given, expected):
                ex.reply(401, b"Unauthorized\n")
                return
        handle(ex)

    return app


def make_servers(handle: Callable[[Exchange], None], options: ServerOptions,
                 quick: Callable[[Request], bool] | None = None) -> list[Http11Server]:
    """Bind every listen address; `quick` as in Http11Server."""
    options.validate()
    context = options.ssl_context()
    app = make_app(handle, options)
    servers = []
    for address in options.listen:
        host, port = parse_listen(address)
        try:
            servers.append(Http11Server((host, port), app, context, options.log, quick))
        except OSError as e:
            raise UsageError(f"cannot listen on {address}: {e.strerror}") from None
    return servers


def serve_forever(servers: list[Http11Server]) -> None:
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
