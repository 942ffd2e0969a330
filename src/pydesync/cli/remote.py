"""The remote side of casync's protocol on stdin/stdout: `pull` serves stores (and an index or
archive), `push` receives them (casync's make with a remote index, store or archive)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PydesyncError, UsageError
from ..parallel import workers_for
from ..store import Store, open_chain, open_store
from .common import Context

if TYPE_CHECKING:
    from ..protocol import Channel, PullServer, PushServer


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    _verb(sub, parent, "pull", run_pull, "serve a store over stdin/stdout (casync protocol)",
          "e.g. `pull - - - /srv/x.castr`. Lets casync and desync clients read from this machine over "
          "ssh (CASYNC_REMOTE_PATH=pydesync).")
    _verb(sub, parent, "push", run_push, "receive into a store over stdin/stdout (casync protocol)",
          "e.g. `push - - /srv/x.caibx /srv/x.castr`. Lets casync's make (CASYNC_REMOTE_PATH=pydesync) "
          "and ours write to this machine over ssh: every chunk is verified, the index and the archive "
          "are renamed into place once complete.")


def _verb(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser, name: str,
          func: Callable[[Context], int], summary: str, example: str) -> None:
    """One of casync's remote verbs: `NAME BASE ARCHIVE INDEX WSTORE [RSTORE...]`."""
    p = sub.add_parser(name, parents=[parent], help=summary,
                       description=f"casync's remote verb: `{name} BASE ARCHIVE INDEX WSTORE [RSTORE...]` "
                                   f"with '-' for unused slots, {example}")
    p.add_argument("base")
    p.add_argument("archive")
    p.add_argument("index")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.set_defaults(func=func)


def run_pull(ctx: Context) -> int:
    from ..protocol import PullServer
    a = ctx.args
    if a.base != "-":
        raise UsageError("pull: the base must be '-'")
    stores = [s for s in a.stores if s != "-"]
    archive = None if a.archive == "-" else a.archive
    index = None if a.index == "-" else a.index
    if not stores and not archive and not index:
        raise UsageError("pull: nothing to serve")
    store = open_chain(stores, options_for=ctx.store_options) if stores else None
    try:
        return _serve(PullServer(_stdio_channel(), store, index, archive), "pull")
    finally:
        if store is not None:
            store.close()


def _stdio_channel() -> Channel:
    from ..protocol import Channel
    for fd in (0, 1):  # casync hands the remote command O_NONBLOCK pipes
        os.set_blocking(fd, True)
    # raw stdout: a send stuck on a client that reads nothing then holds no buffer lock that
    # the interpreter's exit would wait for
    return Channel(sys.stdin.buffer, os.fdopen(1, "wb", buffering=0, closefd=False), "client")


def _serve(server: PullServer | PushServer, verb: str) -> int:
    """Run one session; a failure is an ABORT to the client and one line here."""
    from ..protocol import ProtocolError
    try:
        server.serve()
    except (BrokenPipeError, ConnectionResetError):
        if verb == "pull":
            return 0  # the client hung up: a normal end of a pull
        raise PydesyncError(f"{verb}: the client hung up before the push was complete") from None
    except (ProtocolError, PydesyncError, OSError) as e:
        with contextlib.suppress(OSError):
            server.channel.send_abort(5, str(e))
        raise PydesyncError(f"{verb}: {e}") from None
    return 0

def run_push(ctx: Context) -> int:
    from ..protocol import PushServer
    a = ctx.args
    if a.base != "-":
        raise UsageError("push: the base must be '-'")
    wstore = None if a.stores[0] == "-" else a.stores[0]
    rstores = [s for s in a.stores[1:] if s != "-"]
    archive = None if a.archive == "-" else a.archive
    index = None if a.index == "-" else a.index
    if not wstore and not archive and not index:
        raise UsageError("push: nothing to receive")
    opened: list[Store] = []
    try:
        if wstore:
            opened.append(open_store(wstore, ctx.store_options(wstore), create=True))
        opened += [open_store(loc, ctx.store_options(loc)) for loc in rstores]
        return _serve(PushServer(_stdio_channel(), opened[0] if wstore else None, opened, index, archive,
                                 workers=workers_for(ctx.concurrency, False)), "push")
    finally:
        for store in opened:
            store.close()
