"""HTTP(S) chunk stores: `<base>/<4 hex>/<64 hex><extension>` over pooled keep-alive connections.

The extension and the bytes follow the store's converters (`.cacnk`, none
when uncompressed, `.<alg>-<keyid>` added when encrypted), as on disk.

desync's client semantics: GET 200 is data and 404 is missing (so a chain falls
through to the next store); HEAD answers `has`; PUT stores. Network errors and
5xx answers are retried `error_retry` times in all, attempt n waiting n times
the base interval; after the last one the real status is reported.
"""

from __future__ import annotations

import logging
import ssl
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from ..chunkio import Placement, place_stored
from ..codec import MAX_ENCODED_CHUNK
from ..digest import ChunkId
from ..errors import ChunkMissing, StoreError, UsageError
from ..index import MAX_INDEX_BYTES
from ..netio import decimal
from .base import FormattedStore
from .converters import Converters
from .http_fast import FastHttp, Response, TooLarge, tls_context
from .options import StoreOptions
from .registry import StoreKind

log = logging.getLogger(__name__)

SUFFIX = ".cacnk"


class HttpError(StoreError):
    """An HTTP request failed for good (after retries)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def make_pool(options: StoreOptions) -> urllib3.PoolManager:
    """urllib3 connections (proxies from the environment, redirects), from the store's options."""
    kwargs: dict[str, object] = {
        "maxsize": max(1, options.concurrency),
        "block": False,
        "retries": False,
        "timeout": _urllib3_timeout(options),
    }
    if options.trust_insecure:
        kwargs["cert_reqs"] = "CERT_NONE"
        kwargs["assert_hostname"] = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    else:
        kwargs["cert_reqs"] = "CERT_REQUIRED"
        if options.ca_cert:
            kwargs["ca_certs"] = options.ca_cert
    if options.client_cert:
        kwargs["cert_file"] = options.client_cert
        kwargs["key_file"] = options.client_key
    return urllib3.PoolManager(**kwargs)  # type: ignore[arg-type]  # (urllib3's stubs type **kwargs narrowly)


def _urllib3_timeout(options: StoreOptions) -> urllib3.Timeout:
    timeout = _seconds(options.timeout)
    return urllib3.Timeout(total=timeout) if timeout else urllib3.Timeout(connect=None, read=None)


def _seconds(timeout: float | None) -> float | None:
    return None if timeout in (None, float("inf")) else timeout


def proxy_for(base: str) -> str | None:
    parts = urllib3.util.parse_url(base)
    proxy = urllib.request.getproxies().get(parts.scheme or "http")
    return proxy if proxy and not urllib.request.proxy_bypass(parts.host or "") else None


class HttpClient:
    """Requests against one base URL with desync's retry policy and headers.

    Plain requests go through the lean keep-alive client (one connection per
    thread); redirects and proxies through urllib3.
    """

    def __init__(self, base: str, options: StoreOptions):
        if bool(options.client_cert) != bool(options.client_key):
            raise UsageError("--client-cert and --client-key must be given together")
        try:
            host = urlsplit(base).hostname
        except ValueError as e:
            raise UsageError(f"invalid location '{base}': {e}") from None
        if not host:
            raise UsageError(f"invalid location '{base}': no host")
        self.base = base if base.endswith("/") else base + "/"
        self.options = options
        self.headers: dict[str, str] = {}
        if options.http_auth:
            self.headers["Authorization"] = options.http_auth
        if options.http_cookie:
            self.headers["Cookie"] = options.http_cookie
        proxy = proxy_for(self.base)
        self.pool: urllib3.PoolManager = make_pool(options) if proxy is None else urllib3.ProxyManager(
            proxy, retries=False, timeout=_urllib3_timeout(options))
        self.fast: FastHttp | None = None
        if proxy is None:
            context = None
            if self.base.startswith("https"):
                try:
                    context = tls_context(options.trust_insecure, options.ca_cert, options.client_cert,
                                          options.client_key)
                except (OSError, ssl.SSLError) as e:
                    raise UsageError(f"cannot load TLS certificates: {e}") from None
            self.fast = FastHttp(self.base, _seconds(options.timeout), context, self.headers)
        self._path_prefix = urllib3.util.parse_url(self.base).path or "/"

    @staticmethod
    def quoted(name: str) -> str:
        return quote(name, safe="/.-_~")

    def path_of(self, name: str) -> str:
        """The request target for `name` (the base URL's path included)."""
        return self._path_prefix + self.quoted(name)

    def url(self, name: str) -> str:
        return self.base + self.quoted(name)

    def _once(self, method: str, name: str, body: bytes | None, limit: int,
              started: Callable[[], Response] | None = None) -> tuple[int, bytes | bytearray]:
        """One attempt; `started` finishes a request already sent (FastHttp.begin)."""
        if self.fast is not None:
            if started is not None:
                response = started()
            else:
                response = self.fast.request(method, self.path_of(name), body, limit)
            if not (300 <= response.status < 400 and "location" in response.headers):
                return response.status, response.data
        answer = self.pool.request(method, self.url(name), body=body, headers=self.headers, retries=False,
                                   preload_content=False, redirect=True)
        return answer.status, read_capped(answer, limit)

    def request(self, method: str, name: str, body: bytes | None = None, ok: tuple[int, ...] = (200,),
                missing: tuple[int, ...] = (404,), started: Callable[[], Response] | None = None,
                limit: int = MAX_ENCODED_CHUNK) -> bytes | bytearray | None:
        """The body for an `ok` status, None for a `missing` one; raises HttpError otherwise.
        `started`: the first attempt was already sent (FastHttp.begin), this finishes it. A body
        longer than `limit` is an error before it is held (a hostile server cannot fill memory)."""
        url = self.url(name)
        attempts = max(1, self.options.error_retry)
        last: HttpError | None = None
        for attempt in range(1, attempts + 1):
            try:
                status, data = self._once(method, name, body, limit, started if attempt == 1 else None)
            except TooLarge as e:
                raise HttpError(f"{method} {url}: {e}") from None
            except (Urllib3Error, OSError, ssl.SSLError) as e:
                last = HttpError(f"{method} {url}: {_reason(e)}")
            else:
                if status in ok:
                    return data
                if status in missing:
                    return None
                text = data[:200].decode("utf-8", "replace").strip()
                last = HttpError(f"unexpected status code {status} from {url}"
                                 + (f": {text}" if text and method == "PUT" else ""), status)
                if status < 500:
                    raise last
            if attempt < attempts:
                wait = attempt * self.options.error_retry_base
                log.info("%s, attempt %d of %d; retrying in %.3g s", last, attempt, attempts, wait)
                time.sleep(wait)
        assert last is not None
        raise last

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        self.pool.clear()


def read_capped(answer: urllib3.BaseHTTPResponse, limit: int) -> bytes:
    """A urllib3 answer's body (read unbuffered), refused as TooLarge past `limit` bytes: declared
    lengths are checked first, and an undeclared or lying one is cut off at the limit."""
    try:
        declared = decimal(answer.headers.get("Content-Length", ""))
        if declared is not None and declared > limit:
            raise TooLarge(f"answer of {declared} bytes, longer than {limit} bytes")
        pieces, total = [], 0
        for piece in answer.stream(1 << 20):  # in pieces: http.client preallocates a whole read(n)
            total += len(piece)
            if total > limit:
                raise TooLarge(f"answer longer than {limit} bytes")
            pieces.append(piece)
        answer.release_conn()
        return b"".join(pieces)
    except BaseException:
        answer.close()  # unread bytes would be taken for the next answer: not back to the pool
        raise


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None)
    return str(reason or e)


class HttpStore(FormattedStore):
    """A chunk store behind an HTTP(S) server (desync's chunk-server, a CDN, a static web server)."""

    remote = True

    def __init__(self, location: str, options: StoreOptions | None = None):
        super().__init__(location, options)
        base = location.split("?", 1)[0].split(";", 1)[0]
        self.client = HttpClient(base, self.options)
        self.pipelined = self.client.fast is not None  # (a proxy goes through urllib3, one at a time)

    def _name(self, chunk_id: ChunkId) -> str:
        h = chunk_id.hex()
        return f"{h[:4]}/{h}{self._suffix}"

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        body = self.client.request("GET", self._name(chunk_id))
        if body is None:
            raise ChunkMissing(chunk_id, [self.location])
        return self._decoded(chunk_id, body, digest)

    def begin_get(self, chunk_id: ChunkId, digest: str | None = None) -> Callable[[], bytes]:
        """Send the GET now; the call returned reads, decodes and verifies the answer, with the
        same retries as get() (the request sent counts as the first attempt)."""
        fetch = self._begin_body(chunk_id)
        return lambda: self._decoded(chunk_id, fetch(), digest)

    def _begin_body(self, chunk_id: ChunkId) -> Callable[[], bytes | bytearray]:
        """Send the GET now (pipelined, where the connection allows); the call returned reads the
        body, with get()'s retries and ChunkMissing for a 404."""
        name = self._name(chunk_id)
        started = None
        if self.client.fast is not None:
            try:
                started = self.client.fast.begin("GET", self.client.path_of(name))
            except (OSError, ssl.SSLError):
                started = None  # the request below connects afresh

        def finish() -> bytes | bytearray:
            body = self.client.request("GET", name, started=started)
            if body is None:
                raise ChunkMissing(chunk_id, [self.location])
            return body
        return finish

    def begin_place(self, chunk_id: ChunkId, digest: str | None,
                    placement: Placement) -> Callable[[], bytes | None]:
        """begin_get's request, then the body decoded, verified and written in one native call
        (the ordinary decoding, with its errors, for whatever that call does not handle)."""
        fetch = self._begin_body(chunk_id)
        if self.converters.encrypted:
            return lambda: self._decoded(chunk_id, fetch(), digest)

        def finish() -> bytes | None:
            body = fetch()
            if place_stored(body, self.converters.compressed, chunk_id, digest, not self.options.skip_verify,
                            placement):
                return None
            return self._decoded(chunk_id, body, digest)
        return finish

    def _decoded(self, chunk_id: ChunkId, body: bytes | bytearray, digest: str | None) -> bytes:
        where = self.client.url(self._name(chunk_id))
        return self.checked(chunk_id, body, self.converters, where, digest)

    def get_stored(self, chunk_id: ChunkId) -> tuple[bytes, Converters]:
        """The bytes as served and the converters of their format (for servers)."""
        body = self.client.request("GET", self._name(chunk_id))
        if body is None:
            raise ChunkMissing(chunk_id, [self.location])
        return bytes(body), self.converters

    def has(self, chunk_id: ChunkId) -> bool:
        return self.client.request("HEAD", self._name(chunk_id)) is not None

    @property
    def writable(self) -> bool:
        return True

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        body = bytes(self.in_own_format(chunk_id, stored, fmt))
        self.client.request("PUT", self._name(chunk_id), body=body, ok=(200, 201, 204), missing=())

    def close(self) -> None:
        self.client.close()


def read_index_bytes(location: str, options: StoreOptions | None = None) -> bytes | None:
    """The index at an http(s) location (None if the server has none there)."""
    base, _, name = location.rpartition("/")
    client = HttpClient(base + "/", options or StoreOptions())
    try:
        data = client.request("GET", name, limit=MAX_INDEX_BYTES)
        return bytes(data) if data is not None else None
    finally:
        client.close()


def write_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    """PUT an index to an http(s) location (an index-server with --writable)."""
    base, _, name = location.rpartition("/")
    client = HttpClient(base + "/", options or StoreOptions())
    try:
        client.request("PUT", name, body=data, ok=(200, 201, 204), missing=())
    finally:
        client.close()


KIND = StoreKind("http", lambda location, options, _create: HttpStore(location, options),
                 read_index_bytes, write_index_bytes)
