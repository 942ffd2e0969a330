"""extract: assemble a blob from its index and stores into a file (stream_blob: to a stream).

Each distinct chunk is fetched once (decompressed and verified in a worker
thread) and written at every offset where it occurs, into a sparse temporary
file that is renamed over the target only when complete. All-zero max-size
chunks are never fetched: they stay holes. (The file is not preallocated: on
tmpfs that zeroed memory a core had to wait for, and it gained nothing elsewhere.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from .blobreader import BlobReader, check_size
from .chunkio import Placement, WriteFailed
from .digest import ChunkId, digest_of, null_chunk_id
from .errors import ChunkMissing, PydesyncError, UsageError
from .index import Index, IndexChunk
from .parallel import (
    DEFAULT_CONCURRENCY,
    for_each,
    for_each_pipelined,
    pipeline_shape,
    workers_for,
)
from .partial import PARTIAL, SALVAGE, Target, held_positions, partial_paths
from .platform import clone_range, clone_unsupported
from .seed import (
    INVALID_FAIL,
    INVALID_SKIP,
    InvalidSeeds,
    Seed,
    SeedInvalid,
    Segment,
    first_mismatch,
    plan,
    read_range,
)
from .store.base import Store
from .store.router import StoreRouter

log = logging.getLogger(__name__)


@dataclass
class ExtractStats:
    """desync's `extract --print-stats` fields, and chunks an interrupted run's partial held."""

    chunks_from_seeds: int = 0
    chunks_from_store: int = 0
    chunks_in_place: int = 0
    chunks_from_partial: int = 0
    bytes_copied_from_seeds: int = 0
    bytes_cloned_from_seeds: int = 0
    blocksize: int = 4096
    bytes_total: int = 0
    chunks_total: int = 0
    seeds: int = 1
    chunks_null: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # Worker threads count through these (under the lock: `+=` from threads can lose counts).
    def from_store(self, chunks: int) -> None:
        with self._lock:
            self.chunks_from_store += chunks

    def from_seeds(self, chunks: int, copied: int, cloned: int = 0) -> None:
        with self._lock:
            self.chunks_from_seeds += chunks
            self.bytes_copied_from_seeds += copied
            self.bytes_cloned_from_seeds += cloned

    def held(self, chunks: int, resumed: bool) -> None:
        """Chunks the target already held: an interrupted extract's partial, or the target in place."""
        with self._lock:
            if resumed:
                self.chunks_from_partial += chunks
            else:
                self.chunks_in_place += chunks

    def as_json(self) -> dict[str, int]:
        """The fields desync prints, with its names (and chunks-from-partial after a resume)."""
        keys = ["chunks_from_seeds", "chunks_from_store", "chunks_in_place", "bytes_copied_from_seeds",
                "bytes_cloned_from_seeds", "blocksize", "bytes_total", "chunks_total", "seeds"]
        if self.chunks_from_partial:
            keys.insert(3, "chunks_from_partial")
        return {k.replace("_", "-"): getattr(self, k) for k in keys}


def extract(index: Index, output: str, store: Store, concurrency: int = DEFAULT_CONCURRENCY,
            in_place: bool = False, seeds: Sequence[Seed] = (), invalid_seeds: InvalidSeeds = INVALID_FAIL,
            progress: Callable[[int], None] | None = None, resume: bool = True,
            prefetch: Callable[[list[IndexChunk]], Store | None] | None = None) -> ExtractStats:
    """Write the blob `index` describes to `output`, from seeds where they hold its chunks and from
    `store` for the rest.

    Without in_place the target is replaced atomically (a failure leaves the old
    file untouched); with it, chunks already correct in the target are kept.
    An extract that stops leaves its partial output and index (`.NAME.partial`);
    the next one takes it up (`resume`): every chunk in it is hashed before it
    is kept, the rest is fetched; a partial of another index serves as a seed.
    `invalid_seeds` says what a seed that does not match its index costs: an error
    (`fail`), the seed (`skip`), or a re-chunking of it (`regenerate`); see seed.py.
    `progress(n)` is called as chunks are done: first for those the target already
    holds, so a resumed extract's progress starts where the last one stopped.
    `prefetch(chunks)`, given the chunks left for the stores once the target and
    the seeds have given theirs, may bring them all in at once (extract --sync);
    the store it returns, if any, is read before `store`.
    """
    stats = ExtractStats(bytes_total=index.length, chunks_total=len(index), seeds=1 + len(seeds))
    target = Target(output, index, in_place, resume)  # (cleans up after itself if interrupted)
    seeds = [*seeds, *target.salvage]
    try:
        stats.blocksize = target.blocksize
        usable = _open_seeds(seeds, output)
        todo, nulls = _keep_held(index, target, stats, concurrency, progress)
        if usable:
            copier = _SeedCopier(index, target, usable, invalid_seeds, stats, concurrency, progress, nulls)
            fetch = copier.run(todo)
        else:
            fetch = todo
        log.debug("%d chunks: %d all zero, %d held, %d from seeds, %d to fetch from %s", len(index.chunks),
                  stats.chunks_null, stats.chunks_from_partial + stats.chunks_in_place,
                  stats.chunks_from_seeds, len(fetch), store.location)
        extra = prefetch([index.chunks[i] for i in fetch]) if prefetch is not None and fetch else None
        if extra is not None:
            store = StoreRouter([extra, store])
        started = time.monotonic()
        _fetch(index, fetch, target, store, stats, concurrency, progress)
        log.debug("fetched %d chunks in %.2f s", len(fetch), time.monotonic() - started)
        target.commit()
    except BaseException:
        target.abort()  # (after a completed commit there is nothing left to remove)
        raise
    finally:
        for seed in seeds:
            seed.close()
    return stats


def _keep_held(index: Index, target: Target, stats: ExtractStats, concurrency: int,
               progress: Callable[[int], None] | None) -> tuple[list[int], list[int]]:
    """What the target already holds is kept (a resumed partial, or an in-place target: each chunk
    hashed), and all-zero max-size chunks are zeros (holes in a new file). Returns the positions
    still to be written, and those of the null chunks."""
    null_id = null_chunk_id(index.sizes.max, index.digest)
    chunks = index.chunks
    nulls = [i for i, c in enumerate(chunks) if c.id == null_id and c.size == index.sizes.max]
    null_set = set(nulls)
    todo = [i for i in range(len(chunks)) if i not in null_set]
    stats.chunks_null = len(nulls)
    if target.blank:
        _report(progress, len(nulls))
        return todo, nulls
    held = set(held_positions(target.fd, index, range(len(chunks)), workers_for(concurrency, False)))
    for i in nulls:
        if i not in held:
            target.write(bytes(chunks[i].size), chunks[i].start)
    _copy_within(target, chunks, todo, held)
    kept = [i for i in todo if i in held]
    stats.held(len(kept), target.resumed)
    _report(progress, len(nulls) + len(kept))
    return [i for i in todo if i not in held], nulls


def _copy_within(target: Target, chunks: list[IndexChunk], todo: list[int], held: set[int]) -> None:
    """A chunk the target holds at one of its places (checked) is copied to the others where it is
    wrong (a torn copy of a repeated chunk); those positions are added to `held`."""
    first: dict[ChunkId, IndexChunk] = {}
    for i in sorted(held):
        first.setdefault(chunks[i].id, chunks[i])
    for i in todo:
        source = first.get(chunks[i].id)
        if i not in held and source is not None:
            target.write(os.pread(target.fd, source.size, source.start), chunks[i].start)
            held.add(i)


def _open_seeds(seeds: Sequence[Seed], output: str) -> list[Seed]:
    """Open each seed's blob (one that is the output itself is refused; the output's partials
    given as ordinary seeds are left out: the target takes them up, each chunk checked)."""
    partials = {partial_paths(output, kind)[0] for kind in (PARTIAL, SALVAGE)}
    seeds = [s for s in seeds if s.salvage or os.path.abspath(s.blob) not in partials]
    for seed in seeds:
        with contextlib.suppress(OSError):
            if output and os.path.samefile(seed.blob, output):
                raise UsageError(f"seed {seed.blob} is the output file itself")
        seed.open()
        log.debug("seed %s (index %s, %d chunks)", seed.blob, seed.index_name, len(seed.index.chunks))
    return list(seeds)


def _fetch(index: Index, wanted: list[int], target: Target, store: Store, stats: ExtractStats,
           concurrency: int, progress: Callable[[int], None] | None) -> None:
    """Chunks at the `wanted` positions from the stores: each distinct one fetched once (ssh streams
    them all at once) and written wherever it is wanted."""
    positions: dict[ChunkId, list[IndexChunk]] = {}
    for i in wanted:
        chunk = index.chunks[i]
        positions.setdefault(chunk.id, []).append(chunk)
    digest = index.digest

    def place(data: bytes, need: list[IndexChunk], done: int) -> None:
        """One fetched chunk, size-checked, written at each of `need`; `done` positions reported."""
        check_size(need[0], data)
        for c in need:
            target.write(data, c.start)
        stats.from_store(len(need))
        _report(progress, done)

    def begin(chunk_id: ChunkId) -> Callable[[], None]:
        """Start fetching a chunk; the call returned writes it."""
        need = positions[chunk_id]
        placement = Placement(target.fd, need[0].size, [c.start for c in need])
        fetch = store.begin_place(chunk_id, digest, placement)

        def finish() -> None:
            try:
                data = fetch()
            except WriteFailed as e:
                raise target.write_error(e) from None
            if data is None:  # written where it goes by the store's native path
                stats.from_store(len(need))
                _report(progress, len(need))
            else:
                place(data, need, len(need))
        return finish

    if store.streams:
        for chunk_id, data in store.fetch_many(list(positions), digest):
            if data is None:
                raise ChunkMissing(chunk_id, [store.location])
            place(data, positions[chunk_id], len(positions[chunk_id]))
        return
    threads, depth = pipeline_shape(concurrency, store.remote, store.pipelined)
    for_each_pipelined(begin, list(positions), threads, depth)


def _ranges(positions: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted positions as [start, end) ranges of consecutive ones."""
    start = prev = -1
    for p in positions:
        if start < 0:
            start = prev = p
        elif p == prev + 1:
            prev = p
        else:
            yield start, prev + 1
            start = prev = p
    if start >= 0:
        yield start, prev + 1


def _report(progress: Callable[[int], None] | None, n: int) -> None:
    if progress is not None:
        progress(n)


class _SeedCopier:
    """Runs the seed part of a plan (see seed.py): copies or clones runs of chunks from seeds,
    each chunk checked against its id; returns the target positions left for the stores."""

    def __init__(self, index: Index, target: Target, seeds: list[Seed], invalid_seeds: InvalidSeeds,
                 stats: ExtractStats, concurrency: int, progress: Callable[[int], None] | None,
                 nulls: list[int]):
        self.index = index
        self.chunks = index.chunks
        self.target = target
        self.seeds = seeds
        self.mode = invalid_seeds
        self.stats = stats
        self.concurrency = concurrency
        self.progress = progress
        self.nulls = set(nulls)
        self.leftover: list[int] = []
        self._lock = threading.Lock()
        self.clone_ok = True  # until the filesystem says otherwise

    def run(self, todo: list[int]) -> list[int]:
        """Copy what the seeds hold of the `todo` positions (sorted); returns those left for the
        stores. A seed re-chunked on the way may now hold positions planned for the stores: those
        are planned again."""
        while True:
            generations = [s.generation for s in self.seeds]
            segments = [seg for a, b in _ranges(todo) for seg in plan(self.chunks, self._usable(), self.nulls,
                                                                       a, b)]
            self.leftover = [s.p for s in segments if s.seed is None]
            for_each(self._segment, [s for s in segments if s.seed is not None],
                     workers_for(self.concurrency, False))
            for seed in self.seeds:
                if seed.salvage and not seed.invalid:  # one pass: what it lacked, other seeds may hold
                    seed.invalid = True
                    seed.generation += 1
            todo = sorted(self.leftover)
            if not todo or generations == [s.generation for s in self.seeds]:
                return todo

    def _usable(self) -> list[Seed]:
        return [s for s in self.seeds if not s.invalid]

    def _replan(self, start: int, end: int) -> None:
        for seg in plan(self.chunks, self._usable(), skip=self.nulls, start=start, end=end):
            if seg.seed is None:
                with self._lock:
                    self.leftover.append(seg.p)
            else:
                self._segment(seg)

    def _segment(self, seg: Segment) -> None:
        seed = seg.seed
        assert seed is not None
        if seed.invalid or seg.generation != seed.generation:  # planned before the seed changed
            self._replan(seg.p, seg.p + seg.n)
            return
        chunks = self.chunks[seg.p:seg.p + seg.n]
        src = seed.index.chunks[seg.q].start
        dst = chunks[0].start
        length = chunks[-1].end - dst
        if seed.salvage:
            self._salvage(seed, seg, chunks, src)
            return
        cloned = self._clone(seed, src, length, dst) if self.clone_ok else 0
        if cloned:
            data = read_range(self.target.fd, dst, length)  # check what the clone put there
            bad = first_mismatch(data, chunks, self.index.digest)
            if bad is None:
                self._count(seg.n, length - cloned, cloned)
                return
        else:
            data = read_range(seed.fd, src, length)  # (short at the seed's end: a mismatch)
            bad = first_mismatch(data, chunks, self.index.digest)
            good = length if bad is None else chunks[bad].start - dst
            if good:
                self.target.write(data[:good], dst)
            if bad is None:
                self._count(seg.n, length, 0)
                return
            self._count(bad, good, 0)
        self._invalid(seed, seg, bad, chunks, src)
        self._replan(seg.p + bad, seg.p + seg.n)

    def _salvage(self, seed: Seed, seg: Segment, chunks: list[IndexChunk], src: int) -> None:
        """Copy the chunks of a run from an interrupted extract's partial that hash to their ids;
        the others (never written, or torn by the interruption) are left for the stores."""
        data = read_range(seed.fd, src, chunks[-1].end - chunks[0].start)
        offset = copied = good = 0
        for k, chunk in enumerate(chunks):
            piece = data[offset:offset + chunk.size]
            if len(piece) == chunk.size and digest_of(piece, self.index.digest) == chunk.id:
                self.target.write(piece, chunk.start)
                copied += chunk.size
                good += 1
            else:
                with self._lock:
                    self.leftover.append(seg.p + k)
            offset += chunk.size
        self._count(good, copied, 0)

    def _invalid(self, seed: Seed, seg: Segment, bad: int, chunks: list[IndexChunk], src: int) -> None:
        """A chunk of a seed did not match: fail, drop the seed, or re-chunk it (once per change)."""
        offset = src + chunks[bad].start - chunks[0].start
        if self.mode == INVALID_FAIL:
            raise SeedInvalid(f"seed index for {seed.blob} doesn't match its data: chunk {chunks[bad].id} "
                              f"at offset {offset}")
        if self.mode == INVALID_SKIP or seg.generation > 0:
            seed.invalid = True  # skipping, or still wrong after re-chunking: the seed changes under us
            return
        seed.regenerate(seg.generation, self.concurrency)  # (a no-op if another worker just did)

    def _clone(self, seed: Seed, src: int, length: int, dst: int) -> int:
        try:
            cloned = clone_range(seed.fd, src, length, self.target.fd, dst, self.target.blocksize)
        except OSError as e:
            if not clone_unsupported(e):
                raise PydesyncError(f"cannot clone from seed {seed.blob}: {e.strerror}") from None
            self.clone_ok = False
            return 0
        if not cloned:
            return 0
        head = -src % self.target.blocksize
        tail_start = head + cloned
        if head:  # the unaligned edges are copied
            self.target.write(read_range(seed.fd, src, head), dst)
        if tail_start < length:
            self.target.write(read_range(seed.fd, src + tail_start, length - tail_start), dst + tail_start)
        return cloned

    def _count(self, chunks: int, copied: int, cloned: int) -> None:
        self.stats.from_seeds(chunks, copied, cloned)
        _report(self.progress, chunks)


def stream_blob(index: Index, out: BinaryIO, store: Store, concurrency: int = DEFAULT_CONCURRENCY,
                seeds: Sequence[Seed] = (), progress: Callable[[int], None] | None = None) -> ExtractStats:
    """Write the blob to `out` in order (a pipe, standard output): chunks from seeds where they hold
    them, hashed first, else from the store. Nothing is written that was not verified."""
    stats = ExtractStats(bytes_total=index.length, chunks_total=len(index), seeds=1 + len(seeds))
    reader = BlobReader(index, store, concurrency, _open_seeds(seeds, ""), stats)
    try:
        for piece in reader.iter_range():
            out.write(piece)
            _report(progress, 1)
        out.flush()
    finally:
        for seed in seeds:
            seed.close()
    return stats
