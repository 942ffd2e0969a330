"""What both HTTP servers share: listening (several addresses, TLS, mutual TLS), the
Authorization check, the access log, and the request object handlers see.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

from ..codec import MAX_ENCODED_CHUNK
from ..errors import UsageError
from .http11 import Http11Server, Limits, Request, Service
from .metrics import Metrics

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
    log_format: str = "desync"
    limits: Limits = field(default_factory=Limits)

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
    """Request logic for one server kind; `server()` binds it to the listening sockets.

    Both servers speak GET, HEAD and PUT only; anything else is 405 before the
    subclass sees it.
    """

    name = "server"

    def server(self, options: ServerOptions, metrics: Metrics | None = None) -> Http11Server:
        return make_server(self.name, self._dispatch, options, metrics, quick=self.quick,
                           streams=self.streams, body_limit=self.body_limit)

    def quick(self, req: Request) -> bool:
        """Whether a request (without a body) can be answered without blocking for long, so
        on the event loop's thread (see http11). Default: no."""
        return False

    def streams(self, req: Request) -> bool:
        """Whether a request answers while it reads its body, on a thread of its own. Default: no."""
        return False

    def body_limit(self, req: Request) -> int:
        """The largest body a request may carry (413 beyond). Default: a chunk upload's."""
        return MAX_BODY

    def _dispatch(self, req: Exchange) -> None:
        if req.command not in ("GET", "HEAD", "PUT"):
            req.reply(405, b"only GET, PUT and HEAD are supported\n")
            return
        self.handle(req)

    def handle(self, req: Exchange) -> None:
        raise NotImplementedError


def make_app(handle: Callable[[Exchange], None], options: ServerOptions) -> Callable[[Request], None]:
    """The request entry point: the target's path and the Authorization check, then the handler."""
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


def make_server(name: str, handle: Callable[[Exchange], None], options: ServerOptions,
                metrics: Metrics | None = None, quick: Callable[[Request], bool] | None = None,
                streams: Callable[[Request], bool] | None = None,
                body_limit: Callable[[Request], int] | None = None) -> Http11Server:
    """Bind every listen address of `options` to one server running `handle` behind make_app."""
    return bind(Service(name, make_app(handle, options), quick or never, streams or never,
                        body_limit or (lambda req: MAX_BODY)), options, metrics)


def bind(service: Service, options: ServerOptions, metrics: Metrics | None = None) -> Http11Server:
    """A server for `service` on every listen address of `options` (TLS and log from them too)."""
    options.validate()
    context = options.ssl_context()
    addresses = [parse_listen(a) for a in options.listen]
    try:
        return Http11Server(addresses, service, context, options.log, options.limits, metrics,
                            options.log_format)
    except OSError as e:
        raise UsageError(f"cannot listen on {', '.join(options.listen)}: {e.strerror}") from None


def never(req: Request) -> bool:
    return False
