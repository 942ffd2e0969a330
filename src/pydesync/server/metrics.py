"""Counters an operator watches, exported in Prometheus's format (prometheus_client, the `metrics`
extra) on an address of their own (`--metrics-listen`), beside `/health`.

Off unless asked for: then every call here is a no-op method, so the serving path pays nothing.
The names follow Prometheus's conventions, prefixed `pydesync_`, with the server kind as a label.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import UsageError


class Metrics:
    """The counters of one server process; `Metrics(None)` counts nothing."""

    def __init__(self, server: str | None):
        self.enabled = server is not None
        self.healthy = True
        if server is None:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            raise UsageError("--metrics-listen needs prometheus_client (pip install 'pydesync[metrics]')") \
                from None
        self.registry = prom.CollectorRegistry()
        labels = {"server": server}

        def counter(name: str, doc: str, names: tuple[str, ...] = ()) -> Any:
            return prom.Counter(name, doc, ("server", *names), registry=self.registry)

        self._requests = counter("pydesync_http_requests", "Requests answered, by method and status",
                                 ("method", "status"))
        self._in = counter("pydesync_http_received_bytes", "Bytes received from clients").labels(**labels)
        self._out = counter("pydesync_http_sent_bytes", "Bytes sent to clients").labels(**labels)
        self._refused = counter("pydesync_http_refused", "Requests or connections refused before a handler "
                                "ran (connections, uploads, descriptors, too large, timeout)", ("reason",))
        self._cache = counter("pydesync_chunk_cache_lookups", "Chunk cache lookups in proxy mode, by result",
                              ("result",))
        self._invalid = counter("pydesync_chunk_uploads_rejected", "Uploads refused because the chunk "
                                "did not match its id or did not decode").labels(**labels)
        self._open = prom.Gauge("pydesync_http_connections", "Connections open", ("server",),
                                registry=self.registry).labels(**labels)
        self._server = server
        self._request_children: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self._generate = prom.generate_latest
        self._content_type = prom.CONTENT_TYPE_LATEST

    # ---- counting (no-ops when disabled) ---------------------------------------------------------
    def request(self, method: str, status: int) -> None:
        if not self.enabled:
            return
        key = (method if method in ("GET", "HEAD", "PUT", "POST") else "other", status)
        child = self._request_children.get(key)
        if child is None:
            with self._lock:
                child = self._request_children.setdefault(
                    key, self._requests.labels(server=self._server, method=key[0], status=str(status)))
        child.inc()

    def bytes_in(self, n: int) -> None:
        if self.enabled:
            self._in.inc(n)

    def bytes_out(self, n: int) -> None:
        if self.enabled:
            self._out.inc(n)

    def connections(self, n: int) -> None:
        if self.enabled:
            self._open.set(n)

    def refused(self, reason: str) -> None:
        if self.enabled:
            self._refused.labels(server=self._server, reason=reason).inc()

    def cache(self, hit: bool) -> None:
        if self.enabled:
            self._cache.labels(server=self._server, result="hit" if hit else "miss").inc()

    def upload_rejected(self) -> None:
        if self.enabled:
            self._invalid.inc()

    # ---- exporting -------------------------------------------------------------------------------
    def page(self, path: str) -> tuple[int, bytes, str]:
        """/metrics in Prometheus's text format, /health: 200 while serving, 503 once stopping."""
        text = "text/plain; charset=utf-8"
        if path == "/health":
            return (200, b"ok\n", text) if self.healthy else (503, b"stopping\n", text)
        if path != "/metrics":
            return 404, b"/metrics or /health\n", text
        return 200, self._generate(self.registry), self._content_type

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics and /health on a thread of their own, through the same bounded HTTP/1.1
        core as the service (a few connections, short timeouts); the address bound."""
        from .http11 import Http11Server, Limits, Request, Service

        def handle(req: Request) -> None:
            status, body, content_type = self.page(req.target.split("?", 1)[0]) \
                if req.method in ("GET", "HEAD") else (405, b"GET or HEAD\n", "text/plain; charset=utf-8")
            req._conn.reply(req, status, body, content_type)

        limits = Limits(connections=64, uploads=1, upload_bytes=0, workers=2, head_timeout=10.0,
                        idle_timeout=30.0, stop_grace=0.0)
        service = Service("metrics", handle, quick=lambda req: True, body_limit=lambda req: 0)
        try:
            server = Http11Server([(host, port)], service, limits=limits)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} for metrics: {e.strerror}") from None
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server.server_address
