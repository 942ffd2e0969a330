"""A store whose backing store can be replaced while requests run (chunk-server `--store-file`).

Each request borrows the store that is current when it starts and finishes on
it; a swap makes the new store current at once and closes the old one only
after its last borrower is done, on a background thread, so a reload never
waits on (or breaks) a slow request. Behind a writable server, a store can
only be replaced by another writable one (desync's rule).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..digest import ChunkId
from ..errors import UsageError
from .base import Store


class SwapStore(Store):
    """Delegates to the current store; `swap()` replaces it atomically."""

    def __init__(self, store: Store, require_writable: bool = False):
        """With `require_writable` (a writable server) every replacement must be writable too."""
        self._store = store
        self._require_writable = require_writable
        self._cond = threading.Condition()
        self._borrowers: dict[int, int] = {}  # id(store) -> requests using it
        self._closed = False

    # ---- the current store ---------------------------------------------------------------------
    @property
    def current(self) -> Store:
        return self._store

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Store]:
        """The current store, kept open until the with-block ends even if swapped meanwhile."""
        with self._cond:
            store = self._store
            key = id(store)
            self._borrowers[key] = self._borrowers.get(key, 0) + 1
        try:
            yield store
        finally:
            with self._cond:
                left = self._borrowers[key] - 1
                if left:
                    self._borrowers[key] = left
                else:
                    del self._borrowers[key]
                    self._cond.notify_all()

    def swap(self, new: Store) -> None:
        """Make `new` current; the old store is closed once no request uses it any more."""
        with self._cond:
            if self._closed:
                new.close()
                raise UsageError("store is closed")
            if self._require_writable and not new.writable:
                new.close()
                raise UsageError("a writable store can only be updated with another writable one")
            old, self._store = self._store, new
        threading.Thread(target=self._retire, args=(old,), name="swap-retire", daemon=True).start()

    def _retire(self, old: Store) -> None:
        with self._cond:
            self._cond.wait_for(lambda: id(old) not in self._borrowers)
        old.close()

    # ---- Store ---------------------------------------------------------------------------------
    @property
    def location(self) -> str:  # type: ignore[override]  # (a plain attribute elsewhere; here it follows swaps)
        return self._store.location

    @property
    def remote(self) -> bool:  # type: ignore[override]  # (likewise)
        return self._store.remote

    @property
    def writable(self) -> bool:
        return self._store.writable

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        with self.borrow() as store:
            return store.get(chunk_id, digest)

    def has(self, chunk_id: ChunkId) -> bool:
        with self.borrow() as store:
            return store.has(chunk_id)

    def put(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        with self.borrow() as store:
            store.put(chunk_id, data)

    def stored_size(self, chunk_id: ChunkId) -> int | None:
        with self.borrow() as store:
            return store.stored_size(chunk_id)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            store = self._store
        store.close()
