"""Per-chunk work in one call without the GIL: a block's chunk ids, and stored chunks decoded,
verified and written (OpenSSL and libzstd)."""

from _typeshed import ReadableBuffer

WRITTEN: int
ABSENT: int
DEFER: int

def hash_chunks(
    buffer: ReadableBuffer, start: int, cuts: list[int], kind: int, zero_size: int,
    zero_digest: ReadableBuffer, /
) -> bytes:
    """32-byte digests of buffer[start:cuts[0]], buffer[cuts[0]:cuts[1]], ... concatenated (kind 0:
    SHA512/256, 1: SHA256); an all-zero chunk of zero_size bytes is zero_digest without hashing."""

def write_stored(
    stored: ReadableBuffer, compressed: bool, kind: int, id: ReadableBuffer, size: int, fd: int,
    offsets: list[int], /
) -> int:
    """Decode (zstd), check size and id (kind -1: unchecked), pwrite at each offset: WRITTEN or DEFER."""

def write_file(
    path: bytes, limit: int, compressed: bool, kind: int, id: ReadableBuffer, size: int, fd: int,
    offsets: list[int], /
) -> int:
    """write_stored() of a chunk file read whole: WRITTEN, ABSENT (no file, or a symlink) or DEFER."""
