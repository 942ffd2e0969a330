"""Random access to the bytes an index describes, for everything that reads a blob without
writing it whole: `cat`, mount-index, mtree and the tree digest, the streamed extract to stdout,
and tree extracts, which decode the archive as it comes.

Chunks come from seeds where they hold them (each hashed before it is used), else from the store;
a chunk that comes again later in a range is kept (up to HOLD_BYTES) rather than fetched twice.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .digest import ChunkId, digest_of, null_chunk_id
from .errors import ChunkInvalid
from .index import Index, IndexChunk
from .parallel import DEFAULT_CONCURRENCY, ordered_map, workers_for
from .seed import Seed
from .store.base import Store

if TYPE_CHECKING:
    from .extract import ExtractStats

log = logging.getLogger(__name__)


def check_size(chunk: IndexChunk, data: bytes) -> None:
    if len(data) != chunk.size:
        raise ChunkInvalid(chunk.id, f"unexpected size for chunk {chunk.id}: "
                                     f"{len(data)} bytes, index says {chunk.size}")


def fetch_chunk(index: Index, store: Store, chunk: IndexChunk) -> bytes:
    """One chunk of `index`'s blob: zeros for a null chunk, else from the store, size-checked."""
    if chunk.size == index.sizes.max and chunk.id == null_chunk_id(chunk.size, index.digest):
        return bytes(chunk.size)
    data = store.get(chunk.id, index.digest)
    check_size(chunk, data)
    return data


HOLD_BYTES = 64 << 20  # what a BlobReader keeps of chunks that come again later


class BlobReader:
    """Random access to the bytes an index describes, chunk by chunk: from seeds where they hold a
    chunk (hashed before it is used), else from the store."""

    def __init__(self, index: Index, store: Store, concurrency: int = DEFAULT_CONCURRENCY,
                 seeds: Sequence[Seed] = (), stats: ExtractStats | None = None):
        """`seeds` must be open; `stats` counts where chunks came from."""
        self.index = index
        self.store = store
        self.concurrency = concurrency
        self.seeds = list(seeds)
        self.stats = stats
        self._ends = [c.end for c in index]

    def _fetch(self, chunk: IndexChunk) -> bytes:
        for seed in self.seeds:
            data = self._from_seed(seed, chunk)
            if data is not None:
                if self.stats is not None:
                    self.stats.from_seeds(1, len(data))
                return data
        if self.stats is not None:
            self.stats.from_store(1)
        return fetch_chunk(self.index, self.store, chunk)

    def _from_seed(self, seed: Seed, chunk: IndexChunk) -> bytes | None:
        """The chunk's bytes from a seed's blob, if the seed has them as its index says."""
        for position in seed.positions.get(chunk.id, ())[:1]:
            held = seed.index.chunks[position]
            if held.size != chunk.size:
                continue
            data = os.pread(seed.fd, held.size, held.start)
            if len(data) == held.size and digest_of(data, self.index.digest) == chunk.id:
                return data
            log.info("seed %s does not match its index at offset %d: fetching chunk %s instead",
                     seed.blob, held.start, chunk.id)
        return None

    def iter_range(self, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        """Yield the bytes of [offset, offset+length) in order (length 0 = to the end)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = self.index.length if length == 0 else min(self.index.length, offset + length)
        if offset >= end:
            return
        first = bisect.bisect_right(self._ends, offset)
        chunks = []
        for c in self.index.chunks[first:]:
            if c.start >= end:
                break
            chunks.append(c)
        for chunk, data in zip(chunks, self._each_once(chunks), strict=True):
            lo = max(offset, chunk.start) - chunk.start
            hi = min(end, chunk.end) - chunk.start
            yield data[lo:hi] if (lo, hi) != (0, chunk.size) else data

    def _each_once(self, chunks: list[IndexChunk]) -> Iterator[bytes]:
        """The chunks' bytes in order, each distinct chunk fetched once: a repeat is served from
        what was kept of it (until its last use, HOLD_BYTES at most; beyond, fetched again). A
        pull session would not even answer a second request for an id."""
        last_use = {c.id: i for i, c in enumerate(chunks)}
        firsts: dict[ChunkId, IndexChunk] = {}
        for c in chunks:
            firsts.setdefault(c.id, c)
        workers = workers_for(self.concurrency, self.store.remote)
        fetched = ordered_map(self._fetch, list(firsts.values()), workers)
        held: dict[ChunkId, bytes] = {}
        held_bytes = 0
        seen: set[ChunkId] = set()
        for i, chunk in enumerate(chunks):
            if chunk.id not in seen:
                seen.add(chunk.id)
                data = next(fetched)
                if last_use[chunk.id] > i and held_bytes + len(data) <= HOLD_BYTES:
                    held[chunk.id] = data
                    held_bytes += len(data)
            elif chunk.id in held:
                data = held.pop(chunk.id) if last_use[chunk.id] == i else held[chunk.id]
                if last_use[chunk.id] == i:
                    held_bytes -= len(data)
            else:
                data = self._fetch(chunk)  # kept no longer: fetched again
            yield data

    def read(self, offset: int, length: int) -> bytes:
        """Exactly the bytes [offset, offset+length) (fewer past the end); ValueError for a negative
        offset or length."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        return b"".join(self.iter_range(offset, length)) if length else b""
