"""sync-serve and sync-get: plain files over CAFS's one-round-trip wishlist transfer."""

from __future__ import annotations

import argparse
import json
import os
import random

from ..errors import UsageError
from .common import Context
from .server import add_service_flags, serve_until_stopped, server_metrics, server_options


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sync-serve", parents=[parent],
                       help="offer files for wishlist transfers (CAFS httpsync)",
                       description="Serve each FILE at /<its name>: GET gives its SyncInfo (CAFS chunks, "
                                   "SHA-256 keys), POST with a wishlist streams the chunks asked for. "
                                   "CAFS's httpsync clients and `pydesync sync-get` fetch from it.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-l", "--listen", default="127.0.0.1:8080", help="address (default 127.0.0.1:8080)")
    p.add_argument("--perm-size", type=int, default=256,
                   help="size of the random permutation chunks are shuffled with (1: none)")
    p.add_argument("--log", default=None, metavar="FILE", help="request log file ('-' for stderr)")
    add_service_flags(p)
    p.set_defaults(func=run_sync_serve)

    p = sub.add_parser("sync-get", parents=[parent], help="fetch a file offered by sync-serve or CAFS",
                       description="Fetch URL into OUTPUT in one round trip: only the chunks no --seed "
                                   "file holds are sent. OUTPUT is written to a temporary file and renamed.")
    p.add_argument("url")
    p.add_argument("output")
    p.add_argument("--seed", action="append", default=[], help="a local file that may hold chunks")
    p.add_argument("--print-stats", action="store_true", help="print statistics (JSON) to stdout")
    p.set_defaults(func=run_sync_get)


def run_sync_serve(ctx: Context) -> int:
    from ..remotesync import ServedFile
    from ..server.sync import sync_server
    a = ctx.args
    if a.perm_size < 1:
        raise UsageError("--perm-size must be at least 1")
    files = {}
    for path in a.files:
        if not os.path.isfile(path):
            raise UsageError(f"{path} is not a file")
        perm = list(range(a.perm_size))
        random.shuffle(perm)
        files["/" + os.path.basename(path)] = ServedFile(path, perm)
    a.listen = [a.listen]
    metrics = server_metrics(a, "sync-serve")
    server = sync_server(files, server_options(ctx), metrics)
    return serve_until_stopped(server, "sync-serve", ", ".join(sorted(files)), metrics, a.metrics_listen)


def run_sync_get(ctx: Context) -> int:
    from ..remotesync import sync_get
    a = ctx.args
    stats = sync_get(a.url, a.output, a.seed)
    if a.print_stats:
        print(json.dumps(stats, indent=2))
    return 0
