"""Chunk codecs: casync's zstd frames without content size, xz, gzip; garbage is rejected."""

from __future__ import annotations

import gzip
import lzma
import os

import pytest
import zstandard

from pydesync.codec import CodecError, compress, decompress, detect

DATA = b"casync chunk " * 5000 + os.urandom(1000)


@pytest.mark.parametrize("method", ["zstd", "xz", "gzip"])
def test_round_trip(method):
    encoded = compress(DATA, method)
    assert detect(encoded) == method
    assert decompress(encoded) == DATA


def test_zstd_frame_without_content_size():
    """casync writes streaming frames: no Frame_Content_Size, so one-shot decompress() would fail."""
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    obj = cctx.compressobj()
    frame = obj.compress(DATA) + obj.flush()
    assert zstandard.frame_content_size(frame) == -1
    assert decompress(frame) == DATA


def test_foreign_encoders():
    assert decompress(lzma.compress(DATA, check=lzma.CHECK_CRC64)) == DATA
    assert decompress(gzip.compress(DATA)) == DATA


@pytest.mark.parametrize("method", ["zstd", "xz", "gzip"])
def test_trailing_garbage_rejected(method):
    with pytest.raises(CodecError, match="garbage"):
        decompress(compress(DATA, method) + b"junk")


@pytest.mark.parametrize("method", ["zstd", "xz", "gzip"])
def test_truncation_rejected(method):
    encoded = compress(DATA, method)
    with pytest.raises(CodecError):
        decompress(encoded[: len(encoded) // 2])


def test_raw_bytes_rejected():
    with pytest.raises(CodecError, match="unknown compression"):
        decompress(b"plain uncompressed data")


def test_a_frame_claiming_a_huge_size_is_refused_before_allocating():
    """A hostile store's chunk whose zstd header claims more than 128 MiB: a CodecError, not a
    multi-gigabyte allocation (the frame here really is 129 MiB of zeros, compressed to a few KiB)."""
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(129 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(CodecError, match="larger than 128 MiB"):
        decompress(bomb)
