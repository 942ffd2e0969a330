"""Server commands: chunk-server and index-server."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import TextIO

from ..errors import PydesyncError, UsageError
from ..server import ChunkServer, IndexServer, ServerOptions, serve_forever
from ..server.common import make_servers
from ..server.swap import SwapStore, swapping_handler
from ..store import Store, open_chain
from ..store.converters import wire_converters
from .common import CommaList, Context, add_bool, add_store_options, add_stores


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


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chunk-server", parents=[parent], help="serve chunks over HTTP(S)",
                       description="Serve the chunks of the -s stores (tried in order, behind the -c cache) "
                                   "at /<prefix>/<id>.cacnk. One thread per client connection.")
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


def server_options(ctx: Context) -> ServerOptions:
    a = ctx.args
    return ServerOptions(listen=a.listen or [":http"], cert=a.cert, key=a.key, mutual_tls=a.mutual_tls,
                         client_ca=a.client_ca,
                         authorization=a.authorization or os.environ.get("DESYNC_HTTP_AUTH") or None,
                         log=_log_stream(a.log))


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


def chunk_server_store(ctx: Context) -> Store:
    """The upstream from -s/-c or the --store-file: one writable store with -w, else the chain."""
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
    return open_chain(stores, cache, repair=a.cache_repair, options_for=ctx.store_options)


def reload_on_sighup(ctx: Context, swap: SwapStore) -> None:
    """Re-read the --store-file on every SIGHUP (in a thread); a bad file keeps the old stores."""
    wanted = threading.Event()

    def reloader() -> None:
        while True:
            wanted.wait()
            wanted.clear()
            try:
                swap.swap(chunk_server_store(ctx))
            except (PydesyncError, OSError) as e:
                print(f"failed to reload configuration: {e}", file=sys.stderr, flush=True)
            else:
                print(f"chunk-server: reloaded {ctx.args.store_file}: serving {swap.location}",
                      file=sys.stderr, flush=True)

    threading.Thread(target=reloader, name="store-file-reload", daemon=True).start()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: wanted.set())


def run_chunk_server(ctx: Context) -> int:
    a = ctx.args
    options = server_options(ctx)
    # The format clients exchange, checked before any upstream store is opened.
    wire = wire_converters(a.uncompressed, a.encryption, a.encryption_key, a.encryption_algorithm)
    if a.sync_index_store and not os.path.isdir(a.sync_index_store):
        raise UsageError(f"--sync-index-store {a.sync_index_store} is not a directory")
    upstream = chunk_server_store(ctx)

    def make_server(store: Store) -> ChunkServer:
        return ChunkServer(store, writable=a.writable, uncompressed=a.uncompressed,
                           skip_verify_read=a.skip_verify_read, skip_verify_write=a.skip_verify_write,
                           wire=wire, sync_indexes=a.sync_index_store)

    if a.store_file:
        # reloadable: every request runs on the stores current when it starts
        upstream = SwapStore(upstream, require_writable=a.writable)
        servers = make_servers(swapping_handler(upstream, make_server), options)
        reload_on_sighup(ctx, upstream)
    else:
        servers = make_server(upstream).servers(options)
    where = ", ".join(f"{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    print(f"chunk-server: serving {upstream.location} on {where} "
          f"({'read-write' if a.writable else 'read-only'}; {servers[0].describe()})", file=sys.stderr)
    try:
        serve_forever(servers)
    finally:
        upstream.close()
    return 0


def run_index_server(ctx: Context) -> int:
    a = ctx.args
    if len(a.store) != 1:
        raise UsageError("index-server needs exactly one index store (-s)")
    ctx.index_options(a.store[0] if a.store[0].endswith("/") else a.store[0] + "/")  # no encryption
    options = server_options(ctx)
    server = IndexServer(a.store[0], writable=a.writable)
    servers = server.servers(options)
    where = ", ".join(f"{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    print(f"index-server: serving {a.store[0]} on {where}", file=sys.stderr)
    serve_forever(servers)
    return 0
