"""Compositions of stores: an ordered chain (`-s a -s b`), failover groups (`a|b`) and a cache (`-c`).

Only ChunkMissing falls through a chain; any other error stops the request,
because a store that answers wrongly must not be papered over by the next.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from ..chunkio import Placement
from ..digest import ChunkId
from ..errors import ChunkInvalid, ChunkMissing, PydesyncError
from .base import Store

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreRouter(Store):
    """Try stores in order; a chunk missing in one is looked for in the next."""

    def __init__(self, stores: Sequence[Store]):
        self.stores = list(stores)
        self.location = ", ".join(s.location for s in self.stores)
        self.remote = any(s.remote for s in self.stores)

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        tried: list[str] = []
        hints: list[str] = []
        for store in self.stores:
            try:
                return store.get(chunk_id, digest)
            except ChunkMissing as e:
                tried.extend(e.stores or [store.location])
                hints += [e.hint] if e.hint else []
                log.debug("chunk %s not in %s, trying the next store", chunk_id, store.location)
        raise ChunkMissing(chunk_id, tried, "; ".join(hints))

    @property
    def pipelined(self) -> bool:  # type: ignore[override]  # (a class attribute on Store; here it depends)
        return len(self.stores) == 1 and self.stores[0].pipelined

    def begin_get(self, chunk_id: ChunkId, digest: str | None = None) -> Callable[[], bytes]:
        if len(self.stores) == 1:  # the common `-s URL`: keep the store's own pipelining
            return self.stores[0].begin_get(chunk_id, digest)
        return super().begin_get(chunk_id, digest)

    def begin_place(self, chunk_id: ChunkId, digest: str | None,
                    placement: Placement) -> Callable[[], bytes | None]:
        if len(self.stores) == 1:
            return self.stores[0].begin_place(chunk_id, digest, placement)
        return super().begin_place(chunk_id, digest, placement)

    def has(self, chunk_id: ChunkId) -> bool:
        return any(store.has(chunk_id) for store in self.stores)

    def close(self) -> None:
        for store in self.stores:
            store.close()


class FailoverGroup(Store):
    """Identical stores behind one name; on an error other than 'missing', switch to the next member."""

    def __init__(self, members: Sequence[Store]):
        self.members = list(members)
        self.location = "|".join(m.location for m in self.members)
        self.remote = any(m.remote for m in self.members)
        self._active = 0
        self._lock = threading.Lock()

    def _call(self, fn: Callable[[Store], T]) -> T:
        """fn on the active member; on an error other than 'missing', on the next ones in turn."""
        start = self._active
        last: Exception | None = None
        for step in range(len(self.members)):
            index = (start + step) % len(self.members)
            try:
                return fn(self.members[index])
            except ChunkMissing:
                raise
            except (PydesyncError, OSError) as e:
                last = e
                with self._lock:
                    if self._active == index:  # don't switch again if another request already did
                        self._active = (index + 1) % len(self.members)
                        log.info("failover: %s failed (%s), switching to %s", self.members[index].location,
                                 e, self.members[self._active].location)
        assert last is not None
        raise last

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        return self._call(lambda member: member.get(chunk_id, digest))

    def has(self, chunk_id: ChunkId) -> bool:
        return self._call(lambda member: member.has(chunk_id))

    def close(self) -> None:
        for m in self.members:
            m.close()


class CachedStore(Store):
    """Read through a writable cache: misses are fetched upstream and kept.

    With repair (desync's default), a cached chunk that fails to decode or
    verify counts as missing and is replaced by a fresh copy.
    """

    def __init__(self, cache: Store, upstream: Store, repair: bool = True,
                 on_lookup: Callable[[bool], None] | None = None):
        """`on_lookup(hit)` hears of every get (a server's cache metrics)."""
        self.cache = cache
        self.upstream = upstream
        self.repair = repair
        self.on_lookup = on_lookup
        self.location = f"{upstream.location} (cache {cache.location})"
        self.remote = cache.remote or upstream.remote
        self.listable = cache.listable  # (ids() lists the cache)

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        try:
            data = self.cache.get(chunk_id, digest)
            if self.on_lookup is not None:
                self.on_lookup(True)
            return data
        except ChunkMissing:
            pass
        except ChunkInvalid:
            if not self.repair:
                raise
            self.cache.remove(chunk_id)
        if self.on_lookup is not None:
            self.on_lookup(False)
        data = self.upstream.get(chunk_id, digest)
        self.cache.put(chunk_id, data)
        return data

    def has(self, chunk_id: ChunkId) -> bool:
        return self.cache.has(chunk_id) or self.upstream.has(chunk_id)

    def ids(self) -> Iterator[ChunkId]:
        return self.cache.ids()

    def remove(self, chunk_id: ChunkId) -> None:
        """From the cache (what ids() lists: prune of a cache); the upstream is not ours to change."""
        self.cache.remove(chunk_id)

    def close(self) -> None:
        self.cache.close()
        self.upstream.close()
