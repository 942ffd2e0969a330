"""Server commands: chunk-server and index-server."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from ..errors import UsageError
from ..server import ChunkServer, IndexServer, ServerOptions, serve_forever
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
    add_store_options(p)
    p.set_defaults(func=run_chunk_server)

    p = sub.add_parser("index-server", parents=[parent], help="serve index files over HTTP(S)",
                       description="Serve the index files in the -s directory by name.")
    add_stores(p, help="index store directory", cache=False)
    add_server_flags(p)
    add_store_options(p)
    p.set_defaults(func=run_index_server)


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


def run_chunk_server(ctx: Context) -> int:
    a = ctx.args
    if a.store_file:
        raise UsageError("--store-file is not supported yet")
    if not a.store:
        raise UsageError("no store provided")
    options = server_options(ctx)
    if a.writable:
        if len(a.store) != 1 or a.cache:
            raise UsageError("Only one upstream store supported for writing and no cache")
        upstream = ctx.target(a.store[0])
    else:
        upstream = ctx.source()
    server = ChunkServer(upstream, writable=a.writable, uncompressed=a.uncompressed,
                         skip_verify_read=a.skip_verify_read, skip_verify_write=a.skip_verify_write)
    servers = server.servers(options)
    where = ", ".join(f"{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    print(f"chunk-server: serving {upstream.location} on {where} "
          f"({'read-write' if a.writable else 'read-only'}, one thread per connection)", file=sys.stderr)
    serve_forever(servers)
    return 0


def run_index_server(ctx: Context) -> int:
    a = ctx.args
    if len(a.store) != 1:
        raise UsageError("index-server needs exactly one index store (-s)")
    options = server_options(ctx)
    server = IndexServer(a.store[0], writable=a.writable)
    servers = server.servers(options)
    where = ", ".join(f"{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    print(f"index-server: serving {a.store[0]} on {where}", file=sys.stderr)
    serve_forever(servers)
    return 0
