"""Chunk codecs: casync's zstd frames without content size, xz, gzip; garbage is rejected."""

from __future__ import annotations

import gzip
import lzma
import os
import random
import subprocess
import sys

import pytest
import zstandard
from procutil import HANG_GUARD

from pydesync.codec import CodecError, compress, decompress, detect, zstd_output_bound

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


def rle_frame(blocks: int, block: int = 128 << 10) -> bytes:
    """A zstd frame without a content size, made by hand of `blocks` RLE blocks of `block` bytes
    of b"A" each: 4 bytes of input for every 128 KiB of output."""
    out = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")  # magic; no content size, no checksum; 128 KiB window
    for i in range(blocks):
        header = block << 3 | 1 << 1 | (i == blocks - 1)
        out += header.to_bytes(3, "little") + b"A"
    return bytes(out)


def test_hand_made_rle_frame_decodes():
    """The frames below are valid zstd: three blocks give 384 KiB."""
    assert decompress(rle_frame(3)) == b"A" * (384 << 10)


def test_a_frame_without_content_size_is_bounded_by_its_blocks(tmp_path):
    """casync's frames carry no content size. 128 KiB of RLE blocks would decode to 4 GiB: it is
    refused from its block headers, before decoding. Run under a 1 GiB address-space limit, where
    decoding first and checking after would end in MemoryError."""
    bomb = tmp_path / "bomb.zst"
    bomb.write_bytes(rle_frame(32768))
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from pydesync.codec import CodecError, decompress\n"
        "try:\n"
        f"    decompress(open({str(bomb)!r}, 'rb').read())\n"
        "except CodecError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "refused: chunk larger than 128 MiB"


def test_frame_bound_is_never_below_what_decodes():
    """The block walk must never under-count: frames of random compressible data, with and
    without a checksum, decode to no more than their bound."""
    rng = random.Random(5)
    for checksum in (False, True):
        for size in (0, 1, 1000, 131072, 131073, 400_000):
            data = bytes(rng.choice(b"ab") for _ in range(size // 50)) * 50 + rng.randbytes(size % 50)
            cctx = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=checksum)
            obj = cctx.compressobj()
            frame = obj.compress(data) + obj.flush()
            assert len(data) <= zstd_output_bound(frame)
            assert decompress(frame) == data
