"""casync's content-defined chunker: sizes, discriminator and boundary search.

The per-byte scan runs in C (`_chunker.find_cuts`, GIL released). This module
feeds it: it keeps each chunk's bytes contiguous in one block, so a boundary
never depends on how the input was read, and hands out read-only views of
blocks that are never written again (safe to pass to hashing threads).
"""

from __future__ import annotations

import errno
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from . import _chunker
from .errors import PydesyncError, UsageError

CHUNK_SIZE_LIMIT = 128 * 1024 * 1024  # casync's hard upper limit for min/avg/max
DEFAULT_AVG = 64 * 1024
DEFAULT_BLOCK = 8 * 1024 * 1024


def discriminator(min_size: int, avg: int, max_size: int) -> int:
    """casync's discriminator for `avg`, computed in double, truncated, clamped to [min, max]."""
    d = int(avg / (-1.42888852e-7 * avg + 1.33237515))
    return max(min_size, min(d, max_size))


@dataclass(frozen=True)
class ChunkSizes:
    """Minimum, average and maximum chunk size in bytes, as recorded in an index header."""

    min: int = 16 * 1024
    avg: int = DEFAULT_AVG
    max: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("min", "avg", "max"):
            value = getattr(self, name)
            if not 1 <= value <= CHUNK_SIZE_LIMIT:
                raise UsageError(f"chunk size {name} {value} out of range 1..{CHUNK_SIZE_LIMIT}")
        if not self.min <= self.avg <= self.max:
            raise UsageError(
                f"chunk sizes must satisfy min <= avg <= max (got {self.min}:{self.avg}:{self.max})"
            )

    @classmethod
    def fill(cls, min_size: int = 0, avg: int = 0, max_size: int = 0) -> ChunkSizes:
        """Complete unset (0) sizes the way casync's ca_chunker_set_size does."""
        if not avg:
            if min_size and max_size:
                avg = round(2 ** ((math.log2(min_size) + math.log2(max_size)) / 2))
            elif min_size:
                avg = min_size * 4
            elif max_size:
                avg = max_size // 4
            else:
                avg = DEFAULT_AVG
            avg = max(1, min(avg, CHUNK_SIZE_LIMIT))
        if not min_size:
            min_size = max(avg // 4, 1)
        if not max_size:
            max_size = min(avg * 4, CHUNK_SIZE_LIMIT)
        return cls(min_size, avg, max_size)

    @classmethod
    def parse_kib(cls, spec: str) -> ChunkSizes:
        """Parse desync's `-m min:avg:max` (KiB), or a single `avg` as casync takes it."""
        parts = spec.split(":")
        try:
            values = [int(p) * 1024 for p in parts]
        except ValueError:
            raise UsageError(f"invalid chunk size '{spec}': expected min:avg:max in KiB") from None
        if len(values) == 1:
            return cls.fill(avg=values[0])
        if len(values) != 3:
            raise UsageError(f"invalid chunk size '{spec}': expected min:avg:max in KiB")
        return cls(*values)

    @property
    def discriminator(self) -> int:
        return discriminator(self.min, self.avg, self.max)

    def __str__(self) -> str:
        return f"{self.min}:{self.avg}:{self.max}"


DEFAULT_SIZES = ChunkSizes()


def find_cuts(buffer: bytes | bytearray | memoryview, start: int, end: int, sizes: ChunkSizes,
              final: bool) -> list[int]:
    """Cut offsets in buffer[start:end] (see the C docstring); the scan releases the GIL."""
    return _chunker.find_cuts(buffer, start, end, sizes.min, sizes.max, sizes.discriminator, final)


def chunk_bytes(data: bytes | bytearray | memoryview, sizes: ChunkSizes) -> list[tuple[int, int]]:
    """Chunk an in-memory buffer; returns (start, end) pairs."""
    cuts = find_cuts(data, 0, len(data), sizes, True)
    return list(zip([0, *cuts[:-1]], cuts, strict=False))  # (no data: no cuts, no chunks)


def _fill(reader: BinaryIO, view: memoryview) -> int:
    """Read until `view` is full or EOF; returns the number of bytes read."""
    got = 0
    while got < len(view):
        n = reader.readinto(view[got:])  # type: ignore[attr-defined]  # (typeshed's BinaryIO lacks readinto)
        if not n:
            break
        got += n
    return got


def iter_chunks(reader: BinaryIO, sizes: ChunkSizes, block_size: int = DEFAULT_BLOCK,
                limit: int | None = None, reuse: bool = False) -> Iterator[tuple[int, memoryview]]:
    """Yield (offset, bytes) for each chunk of the stream, in order (see iter_blocks for `reuse`)."""
    for offset, view, cuts in iter_blocks(reader, sizes, block_size, limit, reuse):
        prev = 0
        for cut in cuts:
            yield offset + prev, view[prev:cut].toreadonly()
            prev = cut


def iter_blocks(reader: BinaryIO, sizes: ChunkSizes, block_size: int = DEFAULT_BLOCK,
                limit: int | None = None, reuse: bool = False) -> Iterator[tuple[int, memoryview, list[int]]]:
    """Yield (offset, block, cuts) for each block read: the stream's chunks from `offset` on are
    block[0:cuts[0]], block[cuts[0]:cuts[1]], ... (whole blocks, so per-chunk work can be one call).

    Each block is never modified afterwards, so its chunks may be handed to other
    threads. With `reuse`, two blocks are recycled instead (fewer page faults):
    then a block is only valid until the iteration after next, so the consumer
    must be done with it before moving on. At most `limit` bytes are read.
    """
    block_size = max(block_size, 4 * sizes.max)
    offset = 0  # stream offset of the current chunk start
    tail: memoryview = memoryview(b"")
    remaining = limit
    spare: bytearray | None = None  # with reuse: the block from two iterations ago
    last: bytearray | None = None
    while True:
        want = block_size if remaining is None else min(block_size, len(tail) + remaining)
        size = max(want, len(tail))
        block = spare if spare is not None and len(spare) == size else bytearray(size)
        view = memoryview(block)
        view[: len(tail)] = tail
        room = view[len(tail):]
        got = _fill(reader, room) if len(room) else 0
        if remaining is not None:
            remaining -= got
        end = len(tail) + got
        final = got < len(room) or remaining == 0
        cuts = find_cuts(block, 0, end, sizes, final)
        if cuts:
            yield offset, view.toreadonly(), cuts
        prev = cuts[-1] if cuts else 0
        offset += prev
        if final:
            return
        tail = view[prev:end]
        if reuse:
            spare, last = last, block


# madvise(MADV_POPULATE_READ) (Linux 5.14): maps a window's pages in one call (Python 3.11 lacks the name).
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class InputShrank(PydesyncError):
    """The file got shorter while it was being chunked (its pages could not be mapped)."""


def iter_mapped_blocks(fd: int, start: int, size: int, sizes: ChunkSizes,
                       block_size: int = DEFAULT_BLOCK) -> Iterator[tuple[int, memoryview, list[int]]]:
    """iter_blocks() of the file `fd` from `start` to `size`, through read-only maps of one window
    at a time instead of reads: no copy into a buffer (a third of the CPU of a full-store make
    went to read()'s copy), and only a window's pages resident at a time, so memory stays flat.

    Each window's pages are mapped in one madvise call before they are touched; a file cut
    short under it fails that call (InputShrank) rather than faulting later. Raises OSError
    (before yielding) where the file cannot be mapped, for the caller to read it instead.
    A file truncated after its window was mapped is the one case left: the process gets SIGBUS.
    """
    block_size = max(block_size, 4 * sizes.max)
    pos = start
    while pos < size:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        end = min(pos + block_size, size)
        try:
            window = mmap.mmap(fd, end - base, prot=mmap.PROT_READ, offset=base)
        except ValueError:  # Python's check: the file is shorter than the window now
            raise InputShrank("the input changed size while it was being read") from None
        try:
            window.madvise(_POPULATE_READ, pos - base, end - pos)
        except OSError as e:
            if e.errno == errno.EINVAL:  # an older kernel: pages fault in as they are read
                pass
            else:
                window.close()
                raise InputShrank(f"the input changed size while it was being read ({e.strerror})") from None
        view = memoryview(window)
        cuts = find_cuts(view, pos - base, end - base, sizes, end == size)
        shift = pos - base
        yield pos - start, view[shift:].toreadonly(), [cut - shift for cut in cuts]
        pos = base + cuts[-1]
