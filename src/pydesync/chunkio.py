"""Per-chunk work in one native call: the ids of a block's chunks, and a stored chunk decoded,
verified and written to its places in the output.

The `_chunkio` extension does this without the GIL and without Python per chunk; it is built
where OpenSSL's and libzstd's development files are (setup.py). Without it the same results come
from Python. The native side only does the well-formed case: for anything else it defers, and the
caller does the chunk the ordinary way, whose errors name the chunk and what is wrong with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import _chunker
from .digest import SHA256, SHA512_256, ChunkId, digest_of

try:
    from . import _chunkio
except ImportError:  # built without OpenSSL's or libzstd's headers
    _chunkio = None  # type: ignore[assignment]  # (the module, or None without it)

_KIND = {SHA512_256: 0, SHA256: 1}
NO_VERIFY = -1


class WriteFailed(OSError):
    """The output could not be written (a full disk): the caller names its file."""


def native() -> bool:
    """Whether the native per-chunk calls are there (tests and the bench report it)."""
    return _chunkio is not None


def chunk_ids(block: bytes | bytearray | memoryview, start: int, cuts: Sequence[int], digest: str,
              zero_size: int, zero_id: ChunkId) -> list[ChunkId]:
    """The ids of block[start:cuts[0]], block[cuts[0]:cuts[1]], ...; a chunk of `zero_size` zero
    bytes (a sparse region's max-size chunk) is `zero_id` without being hashed."""
    if _chunkio is not None:
        raw = _chunkio.hash_chunks(block, start, list(cuts), _KIND[digest], zero_size, zero_id)
        return [ChunkId(raw[i:i + 32]) for i in range(0, len(raw), 32)]
    view = memoryview(block)
    ids = []
    for cut in cuts:
        data = view[start:cut]
        zero = len(data) == zero_size and _chunker.is_zero(data)
        ids.append(zero_id if zero else digest_of(data, digest))
        start = cut
    return ids


@dataclass(frozen=True)
class Placement:
    """Where a fetched chunk goes: `size` bytes at each of `offsets` in the open file `fd`."""

    fd: int
    size: int
    offsets: list[int]


def _kind(digest: str | None, verify: bool) -> int:
    return _KIND[digest or SHA512_256] if verify else NO_VERIFY


def _native_write(call: Callable[..., int], *args: object) -> int:
    """A native place call; its failed write (the only OSError it raises) as WriteFailed."""
    try:
        return call(*args)
    except OSError as e:
        raise WriteFailed(e.errno, e.strerror) from None


def place_stored(stored: bytes | bytearray, compressed: bool, chunk_id: ChunkId, digest: str | None,
                 verify: bool, placement: Placement) -> bool:
    """Decode `stored` (zstd if compressed), check its size and id, write it at its places: True
    when done; False when the caller must decode it the ordinary way (another compression, or
    something wrong that deserves its own error). A failed write raises WriteFailed."""
    if _chunkio is None:
        return False
    status = _native_write(_chunkio.write_stored, stored, compressed, _kind(digest, verify), chunk_id,
                           placement.size, placement.fd, placement.offsets)
    return status == _chunkio.WRITTEN


def place_file(path: str, limit: int, compressed: bool, chunk_id: ChunkId, digest: str | None, verify: bool,
               placement: Placement) -> bool | None:
    """place_stored() of the chunk file at `path` (at most `limit` bytes), read in the same call:
    True when done, None when there is no such file (or a symlink), False to do it the ordinary
    way (or without the extension)."""
    if _chunkio is None:
        return False
    status = _native_write(_chunkio.write_file, os.fsencode(path), limit, compressed, _kind(digest, verify),
                           chunk_id, placement.size, placement.fd, placement.offsets)
    if status == _chunkio.ABSENT:
        return None
    return status == _chunkio.WRITTEN
