"""`.caibx` / `.caidx` index files: read, validate, write (as casync's caformat.h lays them out).

What `write` produces is byte-identical to `casync make` for the same chunks,
sizes and flags.
"""

from __future__ import annotations

import io
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from .chunker import CHUNK_SIZE_LIMIT, ChunkSizes
from .digest import FLAG_SHA512_256, SHA256, SHA512_256, ChunkId, digest_from_flags
from .errors import IndexFormatError
from .fsutil import atomic_write

CA_FORMAT_INDEX = 0x96824D9C7B129FF9
CA_FORMAT_TABLE = 0xE75B9E112F17417D
CA_FORMAT_TABLE_TAIL_MARKER = 0x4B4F050E5549ECD1
TABLE_SIZE_UNKNOWN = 0xFFFFFFFFFFFFFFFF
HEADER_SIZE = 48
ITEM_SIZE = 40
#: The largest index read from a peer: 100 million chunks, some 6 TiB of blob at 64 KiB a chunk.
#: Enough for any real image, and a bound on what a hostile server can make us hold.
MAX_INDEX_BYTES = HEADER_SIZE + 16 + ITEM_SIZE * (100_000_000 + 1)

FLAG_EXCLUDE_NODUMP = 0x8000000000000000
FLAG_EXCLUDE_FILE = 0x1000000000000000
FLAG_EXCLUDE_SUBMOUNTS = 0x4000000000000000
# Bits casync knows: WITH_* (low 34 bits) plus the exclude and digest bits.
KNOWN_FLAGS = 0x3FFFFFFFF | FLAG_EXCLUDE_NODUMP | FLAG_EXCLUDE_FILE | FLAG_EXCLUDE_SUBMOUNTS | FLAG_SHA512_256


def blob_flags(digest: str = SHA512_256) -> int:
    """Feature flags `casync make x.caibx` writes for a blob with the given digest."""
    flags = FLAG_EXCLUDE_NODUMP | FLAG_EXCLUDE_FILE
    return flags | (FLAG_SHA512_256 if digest == SHA512_256 else 0)


@dataclass(frozen=True, slots=True)
class IndexChunk:
    """One chunk of an index: where it starts, how long it is, and its id."""

    start: int
    size: int
    id: ChunkId

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class Index:
    """A parsed index: header fields and the ordered chunk list."""

    flags: int = field(default_factory=blob_flags)
    sizes: ChunkSizes = field(default_factory=ChunkSizes)
    chunks: list[IndexChunk] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return digest_from_flags(self.flags)

    @property
    def length(self) -> int:
        """Length of the blob (or catar stream) the index describes."""
        return self.chunks[-1].end if self.chunks else 0

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[IndexChunk]:
        return iter(self.chunks)

    def unique_ids(self) -> list[ChunkId]:
        """Distinct chunk ids in first-use order."""
        return list(dict.fromkeys(c.id for c in self.chunks))

    def append(self, chunk_id: ChunkId, size: int) -> None:
        self.chunks.append(IndexChunk(self.length, size, chunk_id))

    # ---- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self.write_to(out)
        return out.getvalue()

    def write_to(self, f: BinaryIO) -> None:
        """Write the index in casync's exact layout."""
        f.write(struct.pack("<6Q", HEADER_SIZE, CA_FORMAT_INDEX, self.flags,
                            self.sizes.min, self.sizes.avg, self.sizes.max))
        f.write(struct.pack("<2Q", TABLE_SIZE_UNKNOWN, CA_FORMAT_TABLE))
        pack = struct.Struct("<Q32s").pack
        f.write(b"".join(pack(c.end, c.id) for c in self.chunks))
        table_size = 16 + ITEM_SIZE * len(self.chunks) + ITEM_SIZE
        f.write(struct.pack("<5Q", 0, 0, HEADER_SIZE, table_size, CA_FORMAT_TABLE_TAIL_MARKER))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "index") -> Index:
        return parse_index(data, name)

    @classmethod
    def read(cls, f: BinaryIO, name: str = "index") -> Index:
        return parse_index(f.read(), name)


def parse_index(data: bytes, name: str = "index") -> Index:
    """Parse and validate index bytes; every defect raises IndexFormatError naming `name`."""
    flags, sizes, chunks = stream_index(io.BytesIO(data), len(data), name)
    return Index(flags=flags, sizes=sizes, chunks=list(chunks))


def stream_index(f: BinaryIO, size: int, name: str = "index") -> tuple[int, ChunkSizes, Iterator[IndexChunk]]:
    """The flags and chunk sizes of the `size`-byte index in the seekable `f` (checked now, with
    its tail), and its chunks as they are read, each checked (IndexFormatError at the first
    defect): memory stays flat whatever the index's size."""

    def bad(why: str) -> IndexFormatError:
        return IndexFormatError(f"{name}: invalid index: {why}")

    if size < HEADER_SIZE + 16 + ITEM_SIZE:
        raise bad(f"file too short ({size} bytes)")
    head = f.read(HEADER_SIZE + 16)
    if len(head) != HEADER_SIZE + 16:
        raise bad("truncated header")
    hsize, kind, flags, cmin, cavg, cmax = struct.unpack_from("<6Q", head, 0)
    if hsize != HEADER_SIZE or kind != CA_FORMAT_INDEX:
        raise bad("bad magic (not a .caibx/.caidx file)")
    if flags & ~KNOWN_FLAGS:
        raise bad(f"unknown feature flags {flags:#x}")
    if not (1 <= cmin <= cavg <= cmax <= CHUNK_SIZE_LIMIT):
        raise bad(f"bad chunk sizes {cmin}:{cavg}:{cmax}")
    tsize, tkind = struct.unpack_from("<2Q", head, HEADER_SIZE)
    if tsize != TABLE_SIZE_UNKNOWN or tkind != CA_FORMAT_TABLE:
        raise bad("bad table header")
    body = size - HEADER_SIZE - 16
    if body % ITEM_SIZE:
        raise bad("truncated or trailing garbage (size is not a whole number of table items)")
    count = body // ITEM_SIZE - 1
    f.seek(size - ITEM_SIZE)  # the tail first: a truncated index is named as such
    zero, one, hsize, tsize, marker = struct.unpack("<5Q", f.read(ITEM_SIZE))
    if zero or one or hsize != HEADER_SIZE or marker != CA_FORMAT_TABLE_TAIL_MARKER:
        raise bad("missing or bad table tail (truncated?)")
    if tsize != 16 + ITEM_SIZE * count + ITEM_SIZE:
        raise bad("table tail size does not match the table")
    f.seek(HEADER_SIZE + 16)
    return flags, ChunkSizes(cmin, cavg, cmax), _index_items(f, count, cmax, bad)


_ITEM = struct.Struct("<Q32s")
_ITEMS_PER_READ = 4096


def _index_items(f: BinaryIO, count: int, cmax: int,
                 bad: Callable[[str], IndexFormatError]) -> Iterator[IndexChunk]:
    prev = 0
    i = 0
    while i < count:
        want = min(_ITEMS_PER_READ, count - i)
        block = f.read(want * ITEM_SIZE)
        if len(block) != want * ITEM_SIZE:
            raise bad("truncated table")
        for end, raw in _ITEM.iter_unpack(block):
            if end <= prev:
                raise bad(f"chunk {i} offset {end} not after {prev}")
            if end - prev > cmax:
                raise bad(f"chunk {i} at offset {prev} is {end - prev} bytes, over the maximum {cmax}")
            yield IndexChunk(prev, end - prev, ChunkId(raw))
            prev = end
            i += 1


def looks_like_index(path: str) -> bool:
    """Whether the file starts as a .caibx/.caidx does (its header's size and type)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) == 16 and struct.unpack("<2Q", head) == (HEADER_SIZE, CA_FORMAT_INDEX)


def check_index_digest(index: Index, digest: str, name: str = "index") -> Index:
    """An explicitly requested digest must agree with the index's SHA512-256 flag (desync's rule)."""
    if index.digest != digest:
        uses = "SHA512-256" if index.digest == SHA512_256 else "SHA256"
        raise IndexFormatError(f"{name}: index file uses {uses} (select it with --digest {index.digest})")
    return index


def read_index(location: str, digest: str | None = None) -> Index:
    """Read an index from a local path, or from standard input for `-`.

    With `digest`, an index made with the other digest is rejected (as desync does);
    without, the index's own flag decides (as casync does). Index store URLs are the
    caller's: `indexstore.read_index_at` reads those too.
    """
    if digest is not None:
        return check_index_digest(read_index(location), digest, "<stdin>" if location == "-" else location)
    if location == "-":
        return parse_index(sys.stdin.buffer.read(), "<stdin>")
    try:
        with open(location, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise IndexFormatError(f"index {location} does not exist") from None
    except IsADirectoryError:
        raise IndexFormatError(f"index {location} is a directory") from None
    except OSError as e:
        raise IndexFormatError(f"cannot read index {location}: {e.strerror}") from None
    return parse_index(data, location)


def write_index(index: Index, location: str) -> None:
    """Write an index to a local path atomically, or to standard output for `-`.

    Index store URLs are the caller's: `indexstore.write_index_at` writes those too.
    """
    try:
        with atomic_write(location) as f:
            index.write_to(f)
    except OSError as e:
        raise IndexFormatError(f"cannot write index {location}: {e.strerror}") from None


def build_index(pieces: Iterable[tuple[ChunkId, int]], sizes: ChunkSizes, flags: int) -> Index:
    """An Index from (id, size) pairs in order."""
    index = Index(flags=flags, sizes=sizes)
    for chunk_id, size in pieces:
        index.append(chunk_id, size)
    return index


__all__ = [
    "SHA256", "SHA512_256", "Index", "IndexChunk", "blob_flags", "build_index", "check_index_digest",
    "parse_index", "read_index", "write_index",
]
