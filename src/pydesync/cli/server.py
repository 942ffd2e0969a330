"""Server commands: chunk-server and index-server."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from ..errors import PydesyncError, UsageError
from ..store import Store, open_chain
from .common import CommaList, Context, add_bool, add_store_options, add_stores

if TYPE_CHECKING:
    from ..server import ServerOptions
    from ..server.http11 import Http11Server, Limits
    from ..server.metrics import Metrics
    from ..store.swap import SwapStore


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-l", "--listen", action=CommaList, default=[], metavar="ADDRESS",
                   help="address to listen on, host:port (repeatable; default :http)")
    p.add_argument("-w", "--writable", "--writeable", dest="writable", action="store_true",
                   help="accept uploads (PUT)")
    p.add_argument("--log", default=None, metavar="FILE", help="request log file ('-' for stderr)")
    p.add_argument("--cert", default=None, help="TLS certificate (PEM)")
    p.add_argument("--key", default=None, help="TLS key (PEM)")
    p.add_argument("--mutual-tls", action="store_true",
                   help="require client certificates signed by --client-ca")
    p.add_argument("--client-ca", default=None, help="CA for client certificates (with --mutual-tls)")
    p.add_argument("--authorization", default=None,
                   help="require this Authorization header value (default $DESYNC_HTTP_AUTH)")
    add_service_flags(p)


def add_service_flags(p: argparse.ArgumentParser) -> None:
    """What every pydesync server takes beyond desync's flags: logs, metrics, limits."""
    p.add_argument("--log-format", choices=["desync", "common"], default="desync",
                   help="--log lines as desync writes them (default) or in the Common Log Format")
    p.add_argument("--metrics-listen", default=None, metavar="ADDRESS",
                   help="serve Prometheus metrics at /metrics and a health check at /health on this "
                        "address (host:port; needs the `metrics` extra)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="connections open at once; more are answered 503 (default 10000, at most what the "
                        "descriptor limit allows)")
    p.add_argument("--max-uploads", type=int, default=256, metavar="N",
                   help="requests with a body in flight at once; more are answered 503 (default 256)")


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chunk-server", parents=[parent], help="serve chunks over HTTP(S)",
                       description="Serve the chunks of the -s stores (tried in order, behind the -c cache) "
                                   "at /<prefix>/<id>.cacnk. SIGTERM or SIGINT stops it after the requests "
                                   "in flight; SIGHUP reloads a --store-file.")
    add_stores(p, help="upstream store(s)")
    p.add_argument("--store-file", default=None, help="JSON file with stores and cache (reloaded on SIGHUP)")
    add_server_flags(p)
    add_bool(p, "--skip-verify-read", default=True,
             help="don't verify chunks read from upstream (default true)")
    add_bool(p, "--skip-verify-write", default=False,
             help="don't verify uploaded chunks against their id (default false)")
    p.add_argument("-u", "--uncompressed", action="store_true", help="serve and accept uncompressed chunks")
    p.add_argument("--sync-index-store", default=None, metavar="DIR",
                   help="offer one-round-trip transfers (remotesync) of the indexes in DIR at "
                        "/sync/<index name>; `extract --sync URL` uses them")
    add_encryption_flags(p)
    add_store_options(p)
    p.set_defaults(func=run_chunk_server)

    p = sub.add_parser("index-server", parents=[parent], help="serve index files over HTTP(S)",
                       description="Serve the index files in the -s directory by name.")
    add_stores(p, help="index store directory", cache=False)
    add_server_flags(p)
    add_store_options(p)
    p.set_defaults(func=run_index_server)


def add_encryption_flags(p: argparse.ArgumentParser) -> None:
    add_bool(p, "--encryption", default=False,
             help="serve chunks encrypted, expects the key in $DESYNC_ENCRYPTION_KEY unless "
                  "--encryption-key is given")
    p.add_argument("--encryption-key", default=None, metavar="HEX",
                   help="serve chunks encrypted with this hex-encoded 256-bit key, implies --encryption")
    p.add_argument("--encryption-algorithm", default=None, metavar="ALGORITHM",
                   help="encryption algorithm, xchacha20-poly1305 (default) or aes-256-gcm, "
                        "implies --encryption")


def _log_stream(target: str | None) -> TextIO | None:
    if target is None:
        return None
    if target == "-":
        return sys.stderr
    try:
        return open(target, "a", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot open log file {target}: {e.strerror}") from None


def server_options(ctx: Context, default_listen: str = ":http") -> ServerOptions:
    from ..server import ServerOptions
    a = ctx.args
    return ServerOptions(listen=a.listen or [default_listen], cert=getattr(a, "cert", None),
                         key=getattr(a, "key", None), mutual_tls=getattr(a, "mutual_tls", False),
                         client_ca=getattr(a, "client_ca", None),
                         authorization=getattr(a, "authorization", None) or os.environ.get("DESYNC_HTTP_AUTH")
                         or None,
                         log=_log_stream(a.log), log_format=a.log_format, limits=service_limits(a))


def service_limits(a: argparse.Namespace) -> Limits:
    """The server's limits from the flags; the connection cap below the descriptor limit (raised
    to its hard maximum first, as Go programs do), so running out of descriptors stays rare."""
    from ..server.http11 import Limits
    for name in ("max_connections", "max_uploads"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    cap = max(16, raise_descriptor_limit() - 64)  # descriptors for stores, logs and the like
    connections = a.max_connections if a.max_connections is not None else min(10_000, cap)
    return Limits(connections=connections, uploads=a.max_uploads)


def raise_descriptor_limit() -> int:
    """Lift the soft limit on open files to the hard one; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft


def server_metrics(a: argparse.Namespace, name: str) -> Metrics:
    """The metrics of this server (counting nothing without --metrics-listen)."""
    from ..server.metrics import Metrics
    return Metrics(name if a.metrics_listen else None)


class _QuietHandler(logging.StreamHandler):
    """A line per record on stderr; a stderr that is gone costs the line, not a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def show_server_log() -> None:
    """What the servers log (a failed request, an internal error) goes to stderr as plain lines;
    with --verbose the root logger's handler shows it, time-stamped, with the rest."""
    logger = logging.getLogger("pydesync.server")
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = _QuietHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve_until_stopped(server: Http11Server, name: str, what: str, metrics: Metrics,
                        metrics_listen: str | None) -> int:
    """Say where it serves, serve until SIGTERM or SIGINT, then stop: no new connections, requests
    in flight finish (a second signal stops at once). A failure of the server itself is an error.
    The metrics, if asked for, are served from here on."""
    from ..server.common import parse_listen
    show_server_log()
    if metrics_listen:
        host, port = parse_listen(metrics_listen)
        host, port = metrics.serve(host or "0.0.0.0", port)
        print(f"{name}: metrics at http://{host}:{port}/metrics, health at /health", file=sys.stderr)
    print(f"{name}: serving {what} at {', '.join(server.urls())}", file=sys.stderr, flush=True)
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        metrics.healthy = False
        server.stop(now=len(signals) > 1)

    for sig in (signal.SIGTERM, signal.SIGINT):  # kept to the end: a late signal changes nothing
        signal.signal(sig, on_signal)
    try:
        server.serve_forever()
    except Exception as e:  # the loop itself failed: say why, exit non-zero
        raise PydesyncError(f"{name} failed: {e!r}") from None
    why = f"on {signal.Signals(signals[0]).name}" if signals else "(its listeners closed)"
    print(f"{name}: stopped {why} after {server.served} requests", file=sys.stderr, flush=True)
    return 0



def read_store_file(path: str) -> tuple[list[str], str | None]:
    """The stores and cache of a `--store-file`: {"stores": ["loc", "a|b"], "cache": "loc"}."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise UsageError(f"failed to read store-file '{path}': {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"failed to read store-file '{path}': {e}") from None
    stores = raw.get("stores") if isinstance(raw, dict) else None
    cache = raw.get("cache") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not isinstance(stores or [], list) \
            or not all(isinstance(s, str) for s in stores or []) or not isinstance(cache or "", str):
        raise UsageError(f"failed to read store-file '{path}': expected "
                         '{"stores": ["<location>", ...], "cache": "<location>"}')
    return list(stores or []), cache or None


def chunk_server_store(ctx: Context, metrics: Metrics) -> Store:
    """The upstream from -s/-c or the --store-file: one writable store with -w, else the chain
    (its cache lookups counted in `metrics`)."""
    a = ctx.args
    stores, cache = a.store, a.cache
    if a.store_file:
        if stores:
            raise UsageError("--store and --store-file can't be used together")
        if cache:
            raise UsageError("--cache and --store-file can't be used together")
        stores, cache = read_store_file(a.store_file)
    if not stores:
        raise UsageError("no store provided")
    if a.writable:
        if len(stores) != 1 or cache:
            raise UsageError("Only one upstream store supported for writing and no cache")
        return ctx.target(stores[0])
    return open_chain(stores, cache, repair=a.cache_repair, options_for=ctx.store_options,
                      on_cache_lookup=metrics.cache)


def reload_on_sighup(ctx: Context, swap: SwapStore, metrics: Metrics) -> None:
    """Re-read the --store-file on every SIGHUP (in a thread); a bad file keeps the old stores."""
    wanted = threading.Event()

    def reloader() -> None:
        while True:
            wanted.wait()
            wanted.clear()
            try:
                swap.swap(chunk_server_store(ctx, metrics))
            except (PydesyncError, OSError) as e:
                print(f"failed to reload configuration: {e}", file=sys.stderr, flush=True)
            else:
                print(f"chunk-server: reloaded {ctx.args.store_file}: serving {swap.location}",
                      file=sys.stderr, flush=True)

    threading.Thread(target=reloader, name="store-file-reload", daemon=True).start()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: wanted.set())


def run_chunk_server(ctx: Context) -> int:
    from ..server import ChunkServer
    from ..server.common import make_server
    from ..server.swap import swapping_handler
    from ..store.converters import wire_converters
    from ..store.swap import SwapStore
    a = ctx.args
    options = server_options(ctx)
    # The format clients exchange, checked before any upstream store is opened.
    wire = wire_converters(a.uncompressed, a.encryption, a.encryption_key, a.encryption_algorithm)
    if a.sync_index_store and not os.path.isdir(a.sync_index_store):
        raise UsageError(f"--sync-index-store {a.sync_index_store} is not a directory")
    metrics = server_metrics(a, "chunk-server")
    upstream = chunk_server_store(ctx, metrics)
    try:
        def chunk_server(store: Store) -> ChunkServer:
            return ChunkServer(store, writable=a.writable, uncompressed=a.uncompressed,
                               skip_verify_read=a.skip_verify_read, skip_verify_write=a.skip_verify_write,
                               wire=wire, sync_indexes=a.sync_index_store, metrics=metrics)

        if a.store_file:
            # reloadable: every request runs on the stores current when it starts
            upstream = SwapStore(upstream, require_writable=a.writable)
            server = make_server("chunk-server", swapping_handler(upstream, chunk_server), options, metrics,
                                 streams=chunk_server(upstream).streams)
            reload_on_sighup(ctx, upstream, metrics)
        else:
            server = chunk_server(upstream).server(options, metrics)
        mode = "read-write" if a.writable else "read-only"
        auth = ", Authorization required" if options.authorization else ""
        return serve_until_stopped(server, "chunk-server", f"{upstream.location} ({mode}{auth})", metrics,
                                   a.metrics_listen)
    finally:
        upstream.close()


def run_index_server(ctx: Context) -> int:
    from ..server import IndexServer
    a = ctx.args
    if len(a.store) != 1:
        raise UsageError("index-server needs exactly one index store (-s)")
    ctx.index_options(a.store[0] if a.store[0].endswith("/") else a.store[0] + "/")  # no encryption
    options = server_options(ctx)
    metrics = server_metrics(a, "index-server")
    server = IndexServer(a.store[0], writable=a.writable).server(options, metrics)
    mode = "read-write" if a.writable else "read-only"
    auth = ", Authorization required" if options.authorization else ""
    return serve_until_stopped(server, "index-server", f"{a.store[0]} ({mode}{auth})", metrics,
                               a.metrics_listen)
