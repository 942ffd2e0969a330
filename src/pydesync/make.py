"""make: chunk a blob, hash (and store) its chunks, build the index.

A regular file is cut into parts that are chunked at once, one worker thread
per part; each worker reads its part, finds cuts in C, hashes, compresses and
stores inline (all of which release the GIL), so data is read once and never
handed between threads. Because a cut depends only on the bytes since the
previous cut, a part chunked from its own start agrees with the true chunking
from the first cut both share; the join stitches the parts together there and
re-chunks sequentially wherever parts never agree (long runs of zeros). The
result equals sequential chunking for every number of workers.

Streams (stdin, pipes) are chunked sequentially, with hashing and compression
in a thread pool.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from .chunker import DEFAULT_SIZES, ChunkSizes, InputShrank, iter_blocks, iter_chunks, iter_mapped_blocks
from .chunkio import chunk_ids
from .digest import SHA512_256, ChunkId, check_digest, digest_of
from .errors import PydesyncError
from .index import Index, blob_flags
from .indexstore import write_index_at
from .parallel import DEFAULT_CONCURRENCY, ordered_map, workers_for
from .store.base import Store
from .store.options import StoreOptions

BATCH_BYTES = 4 * 1024 * 1024
PART_BLOCK = 4 * 1024 * 1024  # read size of a part worker
MIN_PART = 16 * 1024 * 1024   # parts smaller than this are not worth a thread


@dataclass
class MakeStats:
    """What make did; `chunks_stored` counts chunks newly written to the store."""

    chunks: int = 0
    unique: int = 0
    chunks_stored: int = 0
    size: int = 0
    chunks_produced: int = 0  # including speculative chunks of parts that the join replaced


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


def input_size(f: BinaryIO) -> int | None:
    """Size of a regular file or block device (which can be chunked in parallel), else None."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(f.fileno(), 0, os.SEEK_END)
    return None


class ChunkSink:
    """Names chunks and puts the ones the store lacks; shared by all worker threads.

    All-zero max-size chunks (sparse regions) get their id from a cache instead
    of being hashed again.
    """

    def __init__(self, store: Store | None, digest: str, sizes: ChunkSizes,
                 progress: Callable[[int], None] | None = None, uploads: int = 0):
        self.store = store
        self.progress = progress  # called with each chunk's size as it is named
        self.digest = digest
        self.max = sizes.max
        self.null_id = digest_of(bytes(sizes.max), digest)
        self.seen: set[ChunkId] = set()
        self.stored = 0
        self.produced = 0
        self.lock = threading.Lock()
        # A network store's has() and put() wait on round trips: with `uploads` threads they
        # overlap (at most twice as many chunks waiting), instead of one per chunking worker.
        self._uploads = ThreadPoolExecutor(uploads, "pydesync-upload") if uploads and store else None
        self._upload_slots = threading.BoundedSemaphore(2 * max(1, uploads))
        self._upload_errors: list[BaseException] = []

    def identify_block(self, block: memoryview, cuts: list[int]) -> list[ChunkId]:
        """The ids of a block's chunks block[0:cuts[0]], block[cuts[0]:cuts[1]], ... in one call."""
        if self.progress is not None:
            self.progress(cuts[-1])
        return chunk_ids(block, 0, cuts, self.digest, self.max, self.null_id)

    def identify(self, data: bytes | memoryview) -> ChunkId:
        """One chunk's id (the stream pipeline's chunks come one by one)."""
        return self.identify_block(memoryview(data), [len(data)])[0]

    def keep(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        """Store the chunk unless this run already did or the store has it (in the upload threads,
        if there are any: then a view into a recycled read buffer is copied first; one into a
        mapped window keeps the window alive by itself)."""
        if self.store is None:
            return
        with self.lock:
            if chunk_id in self.seen:
                return
            self.seen.add(chunk_id)
        if self._uploads is None:
            self._store(chunk_id, data)
            return
        if self._upload_errors:
            raise self._upload_errors[0]
        if isinstance(data, memoryview) and not isinstance(data.obj, mmap.mmap):
            data = bytes(data)
        self._upload_slots.acquire()
        self._uploads.submit(self._upload, chunk_id, data)

    def _upload(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        try:
            if not self._upload_errors:
                self._store(chunk_id, data)
        except BaseException as e:
            self._upload_errors.append(e)
        finally:
            self._upload_slots.release()

    def _store(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        assert self.store is not None
        if self.store.buffers_writes or not self.store.has(chunk_id):
            self.store.put(chunk_id, data)
            with self.lock:
                self.stored += 1

    def finish(self) -> None:
        """Wait for the uploads; raise the first that failed."""
        if self._uploads is not None:
            self._uploads.shutdown(wait=True, cancel_futures=bool(self._upload_errors))
            self._uploads = None
        if self._upload_errors:
            raise self._upload_errors[0]

    def __call__(self, batch: list[memoryview]) -> list[tuple[ChunkId, int]]:
        """Hash and keep a batch of chunks (the stream pipeline's worker)."""
        out = []
        for data in batch:
            chunk_id = self.identify(data)
            self.keep(chunk_id, data)
            out.append((chunk_id, len(data)))
        return out


class _PositionalReader:
    """File-like reads from `offset` on with pread, so threads can share one descriptor."""

    def __init__(self, fd: int, offset: int):
        self.fd = fd
        self.offset = offset

    def readinto(self, buf: memoryview) -> int:
        n = os.preadv(self.fd, [buf], self.offset)
        self.offset += n
        return n


@dataclass
class _Part:
    """Chunks one worker found from `start` on; `held` keeps data not yet known to be needed."""

    start: int
    chunks: list[tuple[int, int, ChunkId]] = field(default_factory=list)
    held: dict[int, bytes] = field(default_factory=dict)


def _chunk_from(fd: int, start: int, size: int, sizes: ChunkSizes, sink: ChunkSink,
                stop: Callable[[int], bool], hold_until: int = 0) -> _Part:
    """Chunk, name and keep from `start` until a cut satisfies `stop` (or the end of the file).

    Chunks ending at or before `hold_until` are named but not stored: the join
    stores them if it uses them, so speculative chunks do not litter the store.
    """
    part = _Part(start)
    for offset, block, cuts in _blocks(fd, start, size, sizes):
        block_start = start + offset
        wanted = _cuts_until(cuts, block_start, size, stop)
        prev = 0
        for cut, chunk_id in zip(wanted, sink.identify_block(block, wanted), strict=True):
            data = block[prev:cut]
            chunk_start = block_start + prev
            if block_start + cut <= hold_until:
                part.held[chunk_start] = bytes(data)
            else:
                sink.keep(chunk_id, data)
            part.chunks.append((chunk_start, cut - prev, chunk_id))
            prev = cut
        if len(wanted) < len(cuts) or block_start + cuts[-1] >= size:
            break
    with sink.lock:
        sink.produced += len(part.chunks)
    return part


def _blocks(fd: int, start: int, size: int, sizes: ChunkSizes) -> Iterator[tuple[int, memoryview, list[int]]]:
    """The file's blocks from `start` through maps of it, or by reads where it cannot be mapped."""
    mapped = iter_mapped_blocks(fd, start, size, sizes, PART_BLOCK)
    try:
        first = next(mapped, None)
    except InputShrank:
        raise
    except OSError:  # not mappable (some FUSE and special files): read it
        reader = cast(BinaryIO, _PositionalReader(fd, start))  # (it reads as a file does: readinto)
        yield from iter_blocks(reader, sizes, block_size=PART_BLOCK, limit=size - start,
                               reuse=True)  # each block is finished before the next is read
        return
    if first is not None:
        yield first
        yield from mapped


def _cuts_until(cuts: list[int], block_start: int, size: int, stop: Callable[[int], bool]) -> list[int]:
    """The cuts up to the first that ends the part (at the end of the file, or where `stop` says)."""
    for i, cut in enumerate(cuts):
        end = block_start + cut
        if end >= size or stop(end):
            return cuts[: i + 1]
    return cuts


def _join(parts: list[_Part], fd: int, size: int, sizes: ChunkSizes,
          sink: ChunkSink) -> list[tuple[int, int, ChunkId]]:
    """Stitch parts together at common cuts; re-chunk where no part agrees with the truth."""
    starts: dict[int, tuple[int, int]] = {}
    for pi, part in enumerate(parts):
        for ci, (chunk_start, _size, _id) in enumerate(part.chunks):
            starts.setdefault(chunk_start, (pi, ci))
    out: list[tuple[int, int, ChunkId]] = []
    pos = 0
    while pos < size:
        hit = starts.get(pos)
        if hit is None:
            part = _chunk_from(fd, pos, size, sizes, sink, stop=starts.__contains__)
            taken = part.chunks
        else:
            part = parts[hit[0]]
            taken = part.chunks[hit[1]:]
        for chunk_start, _n, chunk_id in taken:
            held = part.held.get(chunk_start)
            if held is not None:
                sink.keep(chunk_id, held)
        out.extend(taken)
        pos = taken[-1][0] + taken[-1][1]
    return out


def chunk_file(fd: int, size: int, sizes: ChunkSizes = DEFAULT_SIZES, digest: str = SHA512_256,
               store: Store | None = None, concurrency: int = DEFAULT_CONCURRENCY,
               flags: int | None = None, parts: int | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[Index, MakeStats]:
    """Chunk a seekable file of known size in parallel parts (see the module docstring).

    `parts` forces the number of parts; by default it is -n, capped at the
    number of cores (the work is CPU-bound) and at one part per 16 MiB.
    """
    check_digest(digest)
    remote = store is not None and store.remote and not store.buffers_writes
    sink = ChunkSink(store, digest, sizes, progress, uploads=workers_for(concurrency, True) if remote else 0)
    if parts is None:
        parts = min(concurrency, os.cpu_count() or 1, size // max(MIN_PART, 16 * sizes.max))
    count = max(1, min(parts, size))
    bounds = [size * i // count for i in range(count + 1)]
    hold = 4 * sizes.max

    def run(i: int) -> _Part:
        end = bounds[i + 1]
        return _chunk_from(fd, bounds[i], size, sizes, sink, stop=lambda c: c >= end,
                           hold_until=bounds[i] + hold if i else 0)

    try:
        if count == 1:
            found = [run(0)] if size else []
        else:
            with ThreadPoolExecutor(max_workers=count, thread_name_prefix="pydesync-chunk") as pool:
                found = list(pool.map(run, range(count)))
        index = Index(flags=blob_flags(digest) if flags is None else flags, sizes=sizes)
        for _start, n, chunk_id in _join(found, fd, size, sizes, sink):
            index.append(chunk_id, n)
    except BaseException:
        with contextlib.suppress(BaseException):
            sink.finish()  # (its own error, if any, matters less than this one)
        raise
    sink.finish()
    return index, _stats(index, sink)


def chunk_stream(reader: BinaryIO, sizes: ChunkSizes = DEFAULT_SIZES, digest: str = SHA512_256,
                 store: Store | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 flags: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[Index, MakeStats]:
    """Chunk a readable stream into an Index, storing new chunks in `store` if given; `progress`
    is told the bytes chunked.

    Regular files and block devices go through the parallel `chunk_file`.
    """
    size = input_size(reader)
    if size is not None:
        return chunk_file(reader.fileno(), size, sizes, digest, store, concurrency, flags, progress=progress)
    check_digest(digest)
    sink = ChunkSink(store, digest, sizes, progress)
    index = Index(flags=blob_flags(digest) if flags is None else flags, sizes=sizes)
    workers = workers_for(concurrency, store is not None and store.remote)
    for results in ordered_map(sink, _batches(iter_chunks(reader, sizes)), workers):
        for chunk_id, n in results:
            index.append(chunk_id, n)
    sink.produced = len(index)
    return index, _stats(index, sink)


def _stats(index: Index, sink: ChunkSink) -> MakeStats:
    return MakeStats(chunks=len(index), unique=len(set(c.id for c in index)), chunks_stored=sink.stored,
                     size=index.length, chunks_produced=sink.produced)


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


def make(index_path: str | None, source: str | os.PathLike[str], store: Store | None = None,
         sizes: ChunkSizes = DEFAULT_SIZES, digest: str = SHA512_256,
         concurrency: int = DEFAULT_CONCURRENCY,
         progress: Callable[[int], None] | None = None,
         index_options: StoreOptions | None = None) -> tuple[Index, MakeStats]:
    """Chunk the file `source`, store its chunks, and write the index to `index_path` (`-` = stdout,
    or an index store URL, written with `index_options`).

    The index is written last, atomically, so it never refers to chunks that
    were not stored.
    """
    with open_input(source) as reader:
        index, stats = chunk_stream(reader, sizes, digest, store, concurrency, progress=progress)
    if index_path is not None:
        write_index_at(index, index_path, index_options, store)
    elif store is not None:
        store.flush()
    return index, stats
