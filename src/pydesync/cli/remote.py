"""The remote side of casync's protocol: `pull` serves stores (and an index or archive) on stdin/stdout."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..errors import PydesyncError, UsageError
from ..protocol import Channel, ProtocolError, PullServer
from ..store import open_chain
from .common import Context


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pull", parents=[parent], help="serve a store over stdin/stdout (casync protocol)",
                       description="casync's remote verb: `pull BASE ARCHIVE INDEX WSTORE [RSTORE...]` "
                                   "with '-' for unused slots, e.g. `pull - - - /srv/x.castr`. Lets "
                                   "casync and desync clients read from this machine over ssh "
                                   "(CASYNC_REMOTE_PATH=pydesync).")
    p.add_argument("base")
    p.add_argument("archive")
    p.add_argument("index")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.set_defaults(func=run_pull)


def run_pull(ctx: Context) -> int:
    a = ctx.args
    if a.base != "-":
        raise UsageError("pull: the base must be '-'")
    stores = [s for s in a.stores if s != "-"]
    archive = None if a.archive == "-" else a.archive
    index = None if a.index == "-" else a.index
    if not stores and not archive and not index:
        raise UsageError("pull: nothing to serve")
    store = open_chain(stores, options_for=ctx.store_options) if stores else None
    for fd in (0, 1):  # casync hands the remote command O_NONBLOCK pipes
        os.set_blocking(fd, True)
    channel = Channel(sys.stdin.buffer, sys.stdout.buffer, "client")
    try:
        PullServer(channel, store, index, archive).serve()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the client hung up: a normal end of a pull
    except (ProtocolError, PydesyncError, OSError) as e:
        with contextlib.suppress(OSError):
            channel.send_abort(5, str(e))
        raise PydesyncError(f"pull: {e}") from None
    finally:
        if store is not None:
            store.close()
    return 0
