"""Seeds for extract: blobs already on this machine (with their indexes) to copy chunks from.

An A/B update finds most of the new image in the old one. A seed is an index plus the
blob it describes (`--seed v1.caibx` takes `v1` beside it; `--seed-dir` every such pair
in a folder). Planning walks the target index and, at each position, takes the seed
offering the longest run of consecutive matching chunks (most bytes), so whole ranges
are copied, or cloned (FICLONERANGE) where the filesystem shares blocks.

Seed data is never trusted: copied bytes are hashed chunk by chunk before they are
written (one read, no window between a check and the copy), and cloned ranges are read
back from the target and hashed. A seed that does not match its index is handled as
desync does: an error naming it (default), dropped (`skip`, its chunks then come from
the stores), or re-chunked in memory with its index's chunk sizes (`regenerate`), after
which its segments are planned again.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .digest import ChunkId, digest_of
from .errors import PydesyncError, UsageError
from .index import Index, IndexChunk

MAX_RUN_TRIES = 64  # seed positions tried per target position (ids repeated thousands of times)
SEGMENT_CHUNKS = 64  # copy segments are capped so workers share the work

class InvalidSeeds(enum.Enum):
    """What a seed whose data does not match its index costs: an error, the seed (it is left
    out), or a re-chunking of it (desync's --skip-invalid-seeds, --regenerate-invalid-seeds)."""

    FAIL = "fail"
    SKIP = "skip"
    REGENERATE = "regenerate"


INVALID_FAIL, INVALID_SKIP, INVALID_REGENERATE = InvalidSeeds.FAIL, InvalidSeeds.SKIP, InvalidSeeds.REGENERATE


class SeedInvalid(PydesyncError):
    """A seed's data does not match its index."""


@dataclass
class Seed:
    """A blob on disk and its index; positions maps a chunk id to its places in the index."""

    index_name: str
    blob: str
    index: Index
    fd: int = -1
    invalid: bool = False
    generation: int = 0
    positions: dict[ChunkId, list[int]] = field(default_factory=dict)
    #: An interrupted extract's partial output: any chunk in it may be missing or torn, so each is
    #: checked on its own and a bad one is fetched, without judging the rest of the seed.
    salvage: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._map()

    def _map(self) -> None:
        self.positions = {}
        for i, chunk in enumerate(self.index.chunks):
            self.positions.setdefault(chunk.id, []).append(i)

    def open(self) -> None:
        try:
            self.fd = os.open(self.blob, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot open seed {self.blob}: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def longest_run(self, target: list[IndexChunk], p: int, limit: int) -> tuple[int, int, int]:
        """(seed position, chunks, bytes) of the longest run matching target[p:p+limit] (0 chunks if
        none). Runs are compared whole, so a seed that is the target's own index always wins."""
        best = (0, 0, 0)
        if self.invalid:
            return best
        chunks = self.index.chunks
        for q in self.positions.get(target[p].id, ())[:MAX_RUN_TRIES]:
            n, nbytes = 0, 0
            while p + n < len(target) and q + n < len(chunks) and n < limit \
                    and chunks[q + n].id == target[p + n].id and chunks[q + n].size == target[p + n].size:
                nbytes += target[p + n].size
                n += 1
            if nbytes > best[2]:
                best = (q, n, nbytes)
        return best

    def regenerate(self, generation: int, concurrency: int) -> None:
        """Re-chunk the blob with the index's sizes (once per generation, whoever comes first)."""
        from .make import chunk_file

        with self.lock:
            if self.generation != generation:
                return
            size = os.fstat(self.fd).st_size
            self.index, _ = chunk_file(self.fd, size, self.index.sizes, self.index.digest,
                                       concurrency=concurrency, flags=self.index.flags)
            self._map()
            self.generation += 1


@dataclass
class Segment:
    """target[p:p+n] comes from seed positions q:q+n (seed None: fetch target[p] from the stores)."""

    p: int
    n: int
    seed: Seed | None = None
    q: int = 0
    generation: int = 0


def plan(target: list[IndexChunk], seeds: list[Seed], skip: Iterable[int] = (), start: int = 0,
         end: int | None = None, limit: int = SEGMENT_CHUNKS) -> list[Segment]:
    """Segments covering target[start:end]: at each position the seed with the longest run (most
    bytes; the first listed on a tie), else a fetch. Positions in `skip` (null chunks, handled
    apart) are left out; runs are split into segments of at most `limit` chunks for the workers."""
    skipped = set(skip)
    end = len(target) if end is None else end
    out: list[Segment] = []
    p = start
    while p < end:
        if p in skipped:
            p += 1
            continue
        best: tuple[Seed | None, int, int, int] = (None, 0, 0, 0)
        for candidate in seeds:
            q, n, nbytes = candidate.longest_run(target, p, end - p)
            if nbytes > best[3]:
                best = (candidate, q, n, nbytes)
        seed, q, n, _ = best
        if seed is None:
            out.append(Segment(p, 1))
            p += 1
            continue
        for k in range(n):  # pieces of the run between skipped positions, at most `limit` long
            if p + k in skipped:
                continue
            last = out[-1] if out else None
            if last is not None and last.seed is seed and last.p + last.n == p + k and last.n < limit \
                    and last.q + last.n == q + k:
                last.n += 1
            else:
                out.append(Segment(p + k, 1, seed, q + k, seed.generation))
        p += n
    return out


def first_mismatch(data: memoryview, chunks: list[IndexChunk], digest: str) -> int | None:
    """Index (in chunks) of the first chunk of `data` whose hash is not its id, or None."""
    offset = 0
    for k, chunk in enumerate(chunks):
        if digest_of(data[offset:offset + chunk.size], digest) != chunk.id:
            return k
        offset += chunk.size
    return None


def read_range(fd: int, offset: int, length: int) -> memoryview:
    """Exactly `length` bytes at offset (a short file gives fewer)."""
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            return view[:got]
        got += n
    return view
