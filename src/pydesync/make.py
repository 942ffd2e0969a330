"""make: chunk a blob, hash (and store) its chunks, build the index.

Data flows one way: reader -> C chunker (GIL released) -> batches of chunks ->
worker threads that hash, skip chunks the store already has, compress and
write -> index in input order.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .chunker import DEFAULT_SIZES, ChunkSizes, iter_chunks
from .digest import SHA512_256, ChunkId, check_digest, digest_of
from .errors import PydesyncError
from .index import Index, blob_flags, write_index
from .parallel import DEFAULT_CONCURRENCY, ordered_map
from .store.base import Store

BATCH_BYTES = 4 * 1024 * 1024


@dataclass
class MakeStats:
    """What make did; `chunks_stored` counts chunks newly written to the store."""

    chunks: int = 0
    unique: int = 0
    chunks_stored: int = 0
    size: int = 0


@contextlib.contextmanager
def open_input(source: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open the blob to chunk (`-` is standard input) with errors that name it."""
    if source == "-":
        yield sys.stdin.buffer
        return
    path = os.fspath(source)
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise PydesyncError(f"cannot read {path}: is a directory")
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as e:
        raise PydesyncError(f"cannot read {path}: {e.strerror}") from None
    with f:
        yield f


def _batches(chunks: Iterator[tuple[int, memoryview]]) -> Iterator[list[memoryview]]:
    batch: list[memoryview] = []
    size = 0
    for _offset, data in chunks:
        batch.append(data)
        size += len(data)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ChunkSink:
    """Hashes a batch of chunks and puts the ones the store lacks; shared by worker threads."""

    def __init__(self, store: Store | None, digest: str):
        self.store = store
        self.digest = digest
        self.seen: set[ChunkId] = set()
        self.stored = 0
        self.lock = threading.Lock()

    def __call__(self, batch: list[memoryview]) -> list[tuple[ChunkId, int]]:
        out = []
        for data in batch:
            chunk_id = digest_of(data, self.digest)
            out.append((chunk_id, len(data)))
            if self.store is not None and self._first_sight(chunk_id) and not self.store.has(chunk_id):
                self.store.put(chunk_id, data)
                with self.lock:
                    self.stored += 1
        return out

    def _first_sight(self, chunk_id: ChunkId) -> bool:
        with self.lock:
            if chunk_id in self.seen:
                return False
            self.seen.add(chunk_id)
            return True


def chunk_stream(reader: BinaryIO, sizes: ChunkSizes = DEFAULT_SIZES, digest: str = SHA512_256,
                 store: Store | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 flags: int | None = None) -> tuple[Index, MakeStats]:
    """Chunk a readable stream into an Index, storing new chunks in `store` if given."""
    check_digest(digest)
    sink = _ChunkSink(store, digest)
    index = Index(flags=blob_flags(digest) if flags is None else flags, sizes=sizes)
    for results in ordered_map(sink, _batches(iter_chunks(reader, sizes)), concurrency):
        for chunk_id, size in results:
            index.append(chunk_id, size)
    stats = MakeStats(chunks=len(index), unique=len(sink.seen) if store else len(set(index.unique_ids())),
                      chunks_stored=sink.stored, size=index.length)
    return index, stats


def make(index_path: str | None, source: str | os.PathLike[str], store: Store | None = None,
         sizes: ChunkSizes = DEFAULT_SIZES, digest: str = SHA512_256,
         concurrency: int = DEFAULT_CONCURRENCY) -> tuple[Index, MakeStats]:
    """Chunk the file `source`, store its chunks, and write the index to `index_path` (`-` = stdout).

    The index is written last, atomically, so it never refers to chunks that
    were not stored.
    """
    with open_input(source) as reader:
        index, stats = chunk_stream(reader, sizes, digest, store, concurrency)
    if index_path is not None:
        write_index(index, index_path)
    return index, stats
