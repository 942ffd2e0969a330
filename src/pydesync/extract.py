"""extract and cat: assemble a blob from its index and stores.

Each distinct chunk is fetched once (decompressed and verified in a worker
thread) and written at every offset where it occurs, into a preallocated
temporary file that is renamed over the target only when complete. All-zero
max-size chunks are never fetched: they become holes.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .digest import ChunkId, digest_of
from .errors import ChunkInvalid, ChunkMissing, PydesyncError
from .fsutil import temp_name_for
from .index import Index, IndexChunk
from .parallel import DEFAULT_CONCURRENCY, for_each_pipelined, ordered_map, pipeline_shape, workers_for
from .store.base import Store


@dataclass
class ExtractStats:
    """desync's `extract --print-stats` fields."""

    chunks_from_seeds: int = 0
    chunks_from_store: int = 0
    chunks_in_place: int = 0
    bytes_copied_from_seeds: int = 0
    bytes_cloned_from_seeds: int = 0
    blocksize: int = 4096
    bytes_total: int = 0
    chunks_total: int = 0
    seeds: int = 1
    chunks_null: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def as_json(self) -> dict[str, int]:
        """The fields desync prints, with its names."""
        keys = ["chunks_from_seeds", "chunks_from_store", "chunks_in_place", "bytes_copied_from_seeds",
                "bytes_cloned_from_seeds", "blocksize", "bytes_total", "chunks_total", "seeds"]
        return {k.replace("_", "-"): getattr(self, k) for k in keys}


_null_ids: dict[tuple[int, str], ChunkId] = {}


def null_chunk_id(size: int, digest: str) -> ChunkId:
    """Id of `size` zero bytes (the 'null chunk' of all-zero regions), cached."""
    key = (size, digest)
    if key not in _null_ids:
        _null_ids[key] = digest_of(bytes(size), digest)
    return _null_ids[key]


def check_size(chunk: IndexChunk, data: bytes) -> None:
    if len(data) != chunk.size:
        raise ChunkInvalid(chunk.id, f"unexpected size for chunk {chunk.id}: "
                                     f"{len(data)} bytes, index says {chunk.size}")


class _Target:
    """The file being assembled: a temporary file, or the target itself in place."""

    def __init__(self, output: str, length: int, in_place: bool):
        self.output = output
        self.block_device = False
        try:
            st = os.stat(output)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                raise PydesyncError(f"cannot write {output}: is a directory")
            mode = stat.S_IMODE(st.st_mode)
        except FileNotFoundError:
            mode = 0o644
        self.in_place = in_place or self.block_device
        self.path = output if self.in_place else temp_name_for(output)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if self.in_place else os.O_EXCL)
        try:
            self.fd = os.open(self.path, flags, mode)
        except OSError as e:
            raise PydesyncError(f"cannot write {output}: {e.strerror}") from None
        size = os.lseek(self.fd, 0, os.SEEK_END)
        self.blank = not self.in_place or size == 0
        if not self.block_device:
            os.ftruncate(self.fd, length)
        elif size < length:
            self.abort()
            raise PydesyncError(f"device {output} ({size} bytes) is smaller than the blob ({length} bytes)")

    def preallocate(self, chunks: list[IndexChunk], null_id: ChunkId) -> None:
        """Allocate the ranges that will hold data, leaving null chunks as holes.

        Writing into allocated space is much cheaper than allocating page by
        page on the way (notably on tmpfs), and a full disk fails here, early,
        rather than halfway through.
        """
        if not self.blank or self.block_device:
            return
        run_start = run_end = 0
        for chunk in chunks:
            if chunk.id == null_id:
                continue
            if chunk.start != run_end:
                self._allocate(run_start, run_end - run_start)
                run_start = chunk.start
            run_end = chunk.end
        self._allocate(run_start, run_end - run_start)

    def _allocate(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise PydesyncError(f"cannot write {self.output}: {e.strerror}") from None
            # EOPNOTSUPP/EINVAL: the filesystem cannot preallocate; plain writes still work

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def holds(self, chunk: IndexChunk, digest: str) -> bool:
        """Whether the target already has this chunk's bytes at its offset (in-place updates)."""
        if self.blank:
            return False
        existing = os.pread(self.fd, chunk.size, chunk.start)
        return len(existing) == chunk.size and digest_of(existing, digest) == chunk.id

    def commit(self) -> None:
        os.close(self.fd)
        if not self.in_place:
            os.replace(self.path, self.output)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if not self.in_place:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def extract(index: Index, output: str, store: Store, concurrency: int = DEFAULT_CONCURRENCY,
            in_place: bool = False) -> ExtractStats:
    """Write the blob `index` describes to `output`, fetching chunks from `store`.

    Without in_place the target is replaced atomically (a failure leaves the old
    file untouched); with it, chunks already correct in the target are kept.
    """
    stats = ExtractStats(bytes_total=index.length, chunks_total=len(index))
    target = _Target(output, index.length, in_place)
    positions: dict[ChunkId, list[IndexChunk]] = {}
    for chunk in index:
        positions.setdefault(chunk.id, []).append(chunk)
    null_id = null_chunk_id(index.sizes.max, index.digest)
    digest = index.digest
    try:
        target.preallocate(index.chunks, null_id)
    except BaseException:
        target.abort()
        raise

    def begin(chunk_id: ChunkId) -> Callable[[], None]:
        """Decide what a chunk needs and start fetching it; the call returned writes it."""
        todo = positions[chunk_id]
        if chunk_id == null_id and todo[0].size == index.sizes.max:
            _write_zeros(target, todo, stats, digest)
            return _nothing
        need = [c for c in todo if not target.holds(c, digest)]
        stats.add("chunks_in_place", len(todo) - len(need))
        if not need:
            return _nothing
        fetch = store.begin_get(chunk_id, digest)

        def finish() -> None:
            data = fetch()
            check_size(need[0], data)
            for c in need:
                target.write(data, c.start)
            stats.add("chunks_from_store", len(need))
        return finish

    def stream() -> None:
        """Remote stores that can stream (ssh): ask for everything at once, write as chunks arrive."""
        nulls = {i for i in positions if i == null_id and positions[i][0].size == index.sizes.max}
        for i in nulls:
            begin(i)()
        wanted = [i for i in positions if i not in nulls]
        for chunk_id, data in store.fetch_many(wanted, digest):  # type: ignore[attr-defined]
            if data is None:
                raise ChunkMissing(chunk_id, [store.location])
            todo = positions[chunk_id]
            check_size(todo[0], data)
            for c in todo:
                target.write(data, c.start)
            stats.add("chunks_from_store", len(todo))

    try:
        if store.remote and target.blank and getattr(store, "streams", False):
            stream()
        else:
            threads, depth = pipeline_shape(concurrency, store.remote, store.pipelined)
            for_each_pipelined(begin, list(positions), threads, depth)
    except BaseException:
        target.abort()
        raise
    target.commit()
    return stats


def _nothing() -> None:
    pass


def _write_zeros(target: _Target, chunks: list[IndexChunk], stats: ExtractStats, digest: str) -> None:
    """Null chunks: nothing to write in a fresh (sparse) file, zeros over old data otherwise."""
    stats.add("chunks_null", len(chunks))
    if target.blank:
        return
    for c in chunks:
        if not target.holds(c, digest):
            target.write(bytes(c.size), c.start)


class BlobReader:
    """Random access to the bytes an index describes, chunk by chunk from a store."""

    def __init__(self, index: Index, store: Store, concurrency: int = DEFAULT_CONCURRENCY):
        self.index = index
        self.store = store
        self.concurrency = concurrency
        self._ends = [c.end for c in index]

    def _fetch(self, chunk: IndexChunk) -> bytes:
        if chunk.size == self.index.sizes.max and chunk.id == null_chunk_id(chunk.size, self.index.digest):
            return bytes(chunk.size)
        data = self.store.get(chunk.id, self.index.digest)
        check_size(chunk, data)
        return data

    def iter_range(self, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        """Yield the bytes of [offset, offset+length) in order (length 0 = to the end)."""
        end = self.index.length if length <= 0 else min(self.index.length, offset + length)
        if offset >= end:
            return
        first = bisect.bisect_right(self._ends, offset)
        chunks = []
        for c in self.index.chunks[first:]:
            if c.start >= end:
                break
            chunks.append(c)
        workers = workers_for(self.concurrency, self.store.remote)
        for chunk, data in zip(chunks, ordered_map(self._fetch, chunks, workers), strict=True):
            lo = max(offset, chunk.start) - chunk.start
            hi = min(end, chunk.end) - chunk.start
            yield data[lo:hi] if (lo, hi) != (0, chunk.size) else data

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.iter_range(offset, length))
