"""Store maintenance: verify, prune, copy chunks between stores (cache), chop a blob into a store."""

from __future__ import annotations

import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .digest import ChunkId, digest_of
from .errors import ChunkError, ChunkInvalid, ChunkMissing, PydesyncError
from .index import Index
from .make import open_input
from .parallel import DEFAULT_CONCURRENCY, for_each, workers_for
from .store.base import Store


@dataclass
class VerifyResult:
    """Chunks that failed verification: (id, message); `removed` when repair deleted them."""

    checked: int = 0
    invalid: list[tuple[ChunkId, str]] = field(default_factory=list)
    removed: list[ChunkId] = field(default_factory=list)


def verify_store(store: Store, repair: bool = False, concurrency: int = DEFAULT_CONCURRENCY,
                 on_invalid: Callable[[ChunkId, str, bool], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Decode and hash every chunk of a store that can list them (local, sftp); with repair,
    delete the bad ones."""
    result = VerifyResult()
    checked = itertools.count()  # (workers count with next(): `+= 1` from threads can lose counts)
    lock = threading.Lock()

    def check(chunk_id: ChunkId) -> None:
        try:
            store.get(chunk_id)
        except ChunkInvalid as e:
            if repair:
                store.remove(chunk_id)
            with lock:
                if repair:
                    result.removed.append(chunk_id)
                result.invalid.append((chunk_id, str(e)))
            if on_invalid:
                on_invalid(chunk_id, str(e), repair)
        except ChunkMissing:
            pass  # removed while we walked the store
        next(checked)
        if progress is not None:
            progress(1)

    for_each(check, store.ids(), workers_for(concurrency, store.remote))  # streamed: flat memory
    result.checked = next(checked)
    return result


def referenced_ids(indexes: Iterable[Index]) -> set[ChunkId]:
    ids: set[ChunkId] = set()
    for index in indexes:
        ids.update(c.id for c in index)
    return ids


def prune(store: Store, keep: set[ChunkId], concurrency: int = DEFAULT_CONCURRENCY,
          progress: Callable[[int], None] | None = None) -> int:
    """Delete every chunk in the store that is not in `keep` (and leftover temp files); returns count.
    The listing is streamed and deletions run in parallel on network stores."""
    removed = itertools.count()

    def remove(chunk_id: ChunkId) -> None:
        store.remove(chunk_id)
        next(removed)
        if progress is not None:
            progress(1)

    unwanted = (i for i in store.ids() if i not in keep)
    for_each(remove, unwanted, workers_for(concurrency, store.remote) if store.remote else 1)
    store.remove_temporaries()
    return next(removed)


def copy_chunks(ids: Iterable[ChunkId], source: Store, target: Store,
                concurrency: int = DEFAULT_CONCURRENCY,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy chunks the target lacks from source to target (desync `cache`); returns how many."""
    copied = itertools.count()

    def copy(chunk_id: ChunkId) -> None:
        if target.buffers_writes or not target.has(chunk_id):
            target.put(chunk_id, source.get(chunk_id))
            next(copied)
        if progress:
            progress(1)

    for_each(copy, list(dict.fromkeys(ids)), workers_for(concurrency, source.remote or target.remote))
    target.flush()
    return next(copied)


def chop(index: Index, blob: str, store: Store, ignore: set[ChunkId] | None = None,
         concurrency: int = DEFAULT_CONCURRENCY) -> int:
    """Cut `blob` where the index says, check each piece's id, store the ones missing; returns count."""
    ignore = ignore or set()
    wanted = {}
    for chunk in index:
        if chunk.id not in ignore and chunk.id not in wanted:
            wanted[chunk.id] = chunk
    with open_input(blob) as f:
        fd = f.fileno()
        stored = itertools.count()

        def cut(chunk_id: ChunkId) -> None:
            chunk = wanted[chunk_id]
            if not store.buffers_writes and store.has(chunk_id):
                return
            data = os.pread(fd, chunk.size, chunk.start)
            if len(data) != chunk.size or digest_of(data, index.digest) != chunk_id:
                raise ChunkInvalid(chunk_id, f"data in {blob} at offset {chunk.start} does not match "
                                             f"chunk {chunk_id} of the index")
            store.put(chunk_id, data)
            next(stored)

        for_each(cut, list(wanted), workers_for(concurrency, store.remote))
    store.flush()
    return next(stored)


def verify_index(index: Index, blob: str, concurrency: int = DEFAULT_CONCURRENCY) -> None:
    """Check that `blob` is exactly what the index describes; raise naming the first bad chunk."""
    with open_input(blob) as f:
        fd = f.fileno()
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) and st.st_size != index.length:
            raise PydesyncError(f"{blob} is {st.st_size} bytes, index describes {index.length} bytes")

        def check(i: int) -> None:
            chunk = index.chunks[i]
            data = os.pread(fd, chunk.size, chunk.start)
            if len(data) != chunk.size or digest_of(data, index.digest) != chunk.id:
                raise ChunkError(chunk.id, f"{blob} doesn't match its index: chunk {i} ({chunk.id}) "
                                           f"at offset {chunk.start} differs")

        for_each(check, range(len(index)), workers_for(concurrency, False))
