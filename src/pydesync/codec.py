"""Chunk file encoding: zstd (default), xz and gzip, detected by magic bytes.

casync writes zstd frames without a content size, so decoding always goes
through a streaming decompressor; every decoder also rejects trailing garbage.
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
            else:  # casync's streaming frames carry no content size (see SECURITY.md on their output)
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
