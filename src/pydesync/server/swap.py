"""chunk-server `--store-file`: requests served through a SwapStore (store/swap.py).

`swapping_handler` serves chunk-server requests through the current store:
it keeps one ChunkServer per store generation, so the server's fast paths
(sendfile from a local store, copying stored bytes when formats agree) see
the real store, not this wrapper.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..store.base import Store
from ..store.swap import SwapStore
from .common import Exchange


def swapping_handler(swap: SwapStore, make_server: Callable[[Store], object]) -> Callable[[Exchange], None]:
    """A request handler running each request on a server built for the store current at its start.

    `make_server(store)` returns a server App (a ChunkServer); its `_dispatch` answers.
    """
    lock = threading.Lock()
    latest: list[tuple[Store, object]] = []

    def server_for(store: Store) -> object:
        with lock:
            if latest and latest[0][0] is store:
                return latest[0][1]
            server = make_server(store)
            latest[:] = [(store, server)]
            return server

    def handle(req: Exchange) -> None:
        with swap.borrow() as store:
            server_for(store)._dispatch(req)  # type: ignore[attr-defined]  # method check included

    return handle
