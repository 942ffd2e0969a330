"""Chunk file encoding: zstd (default), xz and gzip, detected by magic bytes.

casync writes zstd frames without a content size, so decoding goes through a
streaming decompressor, after the frame's block headers have bounded what it can
produce; every decoder also rejects trailing garbage.
Compressor objects are not thread-safe, so each thread keeps its own.
"""

from __future__ import annotations

import gzip
import lzma
import re
import threading
import zlib

import zstandard

from .errors import PydesyncError

ZSTD = "zstd"
XZ = "xz"
GZIP = "gzip"
NONE = "none"

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
MAX_CHUNK = 128 * 1024 * 1024
#: A stored or transferred chunk: the largest chunk, compressed in the worst case (zstd adds
#: 0.4% to incompressible data), encrypted. Readers refuse more before holding it.
MAX_ENCODED_CHUNK = MAX_CHUNK + (1 << 20)
ZSTD_BLOCK_MAX = 128 * 1024  # RFC 8878: no block, of any kind, decodes to more than this
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)


class CodecError(PydesyncError):
    """Chunk bytes that are not one well-formed compressed stream."""


_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=3)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def detect(data: bytes | memoryview) -> str:
    """Name the compression of `data` from its magic bytes."""
    head = bytes(data[:6])
    if head.startswith(ZSTD_MAGIC):
        return ZSTD
    if head.startswith(XZ_MAGIC):
        return XZ
    if head.startswith(GZIP_MAGIC):
        return GZIP
    raise CodecError("unknown compression (no zstd, xz or gzip magic)")


def compress(data: bytes | memoryview, method: str = ZSTD) -> bytes:
    """Encode a chunk for storage the way casync does for `method`."""
    if method == ZSTD:
        return _zstd_compressor().compress(data)
    if method == XZ:
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)
    if method == GZIP:
        return gzip.compress(bytes(data), compresslevel=6, mtime=0)
    if method == NONE:
        return bytes(data)
    raise CodecError(f"unknown compression '{method}'")


def zstd_output_bound(data: bytes | memoryview) -> int:
    """The most one zstd frame can decode to, read from its block headers without decoding.

    A frame without a content size can expand 30,000-fold (a 4-byte RLE block is 128 KiB), so
    this is what keeps a hostile chunk from taking gigabytes before the size check. Raw and RLE
    blocks count their declared size, a compressed block the largest a block can be; the walk
    stops at the last block or the end of the data, which is all a decoder could reach either.
    Costs a few microseconds per 128 KiB of output.
    """
    view = memoryview(data)
    end = len(view)
    if end < 5:
        return 0
    descriptor = view[4]
    single_segment = descriptor & 0x20
    content_size_bytes = _CONTENT_SIZE_BYTES[descriptor >> 6] or (1 if single_segment else 0)
    at = 5 + (0 if single_segment else 1) + _DICT_ID_BYTES[descriptor & 3] + content_size_bytes
    total = 0
    while at + 3 <= end and total <= MAX_CHUNK:
        header = view[at] | view[at + 1] << 8 | view[at + 2] << 16
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 1:  # RLE: one byte, repeated `size` times
            total, at = total + size, at + 4
        else:  # raw: `size` bytes as they are; compressed: `size` bytes, at most a block out
            total, at = total + (size if kind == 0 else ZSTD_BLOCK_MAX), at + 3 + size
        if header & 1:  # Last_Block
            break
    return total


def decompress(data: bytes | memoryview) -> bytes:
    """Decode one compressed chunk of any supported kind; trailing bytes are an error."""
    method = detect(data)
    try:
        if method == ZSTD:
            size = zstandard.frame_content_size(data)
            if size > MAX_CHUNK:  # refused before that much memory is taken
                raise CodecError("chunk larger than 128 MiB")
            if size > 0:
                # One-shot: exact-size output; trailing bytes raise ZstdError.
                out, ok, rest = _zstd_decompressor().decompress(data, allow_extra_data=False), True, b""
            else:  # casync's streaming frames carry no content size: bound them by their blocks
                if zstd_output_bound(data) > MAX_CHUNK:
                    raise CodecError("chunk larger than 128 MiB")
                obj = _zstd_decompressor().decompressobj()
                out = obj.decompress(data)
                ok, rest = obj.eof, obj.unused_data
        elif method == XZ:
            xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = xz.decompress(data, max_length=MAX_CHUNK + 1)
            ok, rest = xz.eof, xz.unused_data
        else:
            gz = zlib.decompressobj(wbits=31)
            out = gz.decompress(data, MAX_CHUNK + 1)
            ok, rest = gz.eof, gz.unused_data
    except (zstandard.ZstdError, lzma.LZMAError, zlib.error) as e:
        extra = re.search(r"contains (\d+) bytes of unused data", str(e))
        if extra:
            raise CodecError(f"{extra.group(1)} bytes of garbage after the {method} stream") from None
        raise CodecError(f"corrupt {method} data: {e}") from None
    if not ok:
        raise CodecError(f"truncated {method} data")
    if rest:
        raise CodecError(f"{len(rest)} bytes of garbage after the {method} stream")
    if len(out) > MAX_CHUNK:
        raise CodecError("chunk larger than 128 MiB")
    return out
