"""Index files: layout, round trips and every malformation rejected with a clear error."""

from __future__ import annotations

import struct

import pytest

from pydesync.chunker import ChunkSizes
from pydesync.digest import SHA256, ChunkId, digest_of
from pydesync.errors import IndexFormatError
from pydesync.index import Index, blob_flags, parse_index


def sample_index(n: int = 3) -> Index:
    index = Index(sizes=ChunkSizes(1024, 4096, 16384))
    for i in range(n):
        index.append(digest_of(bytes([i]) * 100), 1000 + i)
    return index


def test_layout_matches_format():
    data = sample_index(3).to_bytes()
    assert len(data) == 104 + 40 * 3
    assert struct.unpack_from("<6Q", data) == (48, 0x96824D9C7B129FF9, 0xB000000000000000, 1024, 4096, 16384)
    assert struct.unpack_from("<2Q", data, 48) == (2**64 - 1, 0xE75B9E112F17417D)
    assert struct.unpack_from("<Q", data, 64)[0] == 1000
    assert struct.unpack_from("<Q", data, 104)[0] == 2001
    assert struct.unpack_from("<5Q", data, len(data) - 40) == (0, 0, 48, 16 + 40 * 3 + 40, 0x4B4F050E5549ECD1)


def test_round_trip():
    index = sample_index(5)
    again = parse_index(index.to_bytes())
    assert again == index
    assert again.to_bytes() == index.to_bytes()
    assert again.length == sum(1000 + i for i in range(5))


def test_empty_index():
    index = Index()
    data = index.to_bytes()
    assert len(data) == 104
    assert parse_index(data).chunks == []
    assert parse_index(data).length == 0


def test_flags_select_digest():
    assert blob_flags() == 0xB000000000000000
    assert blob_flags(SHA256) == 0x9000000000000000
    assert Index(flags=0x9000000000000000).digest == SHA256
    assert Index(flags=0xA000000000000000).digest == "sha512-256"  # desync's flags


def corrupt(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


GOOD = sample_index(3).to_bytes()


@pytest.mark.parametrize("data,why", [
    (b"", "too short"),
    (GOOD[:40], "too short"),
    (GOOD[:-1], "truncated"),
    (GOOD[:-40], "tail"),
    (GOOD[:120], "truncated"),
    (corrupt(GOOD, 8, "<Q", 1), "bad magic"),
    (corrupt(GOOD, 0, "<Q", 40), "bad magic"),
    (corrupt(GOOD, 16, "<Q", 1 << 40), "unknown feature flags"),
    (corrupt(GOOD, 24, "<Q", 0), "chunk sizes"),
    (corrupt(GOOD, 24, "<Q", 8192), "chunk sizes"),
    (corrupt(GOOD, 48, "<Q", 1000), "table header"),
    (corrupt(GOOD, 64 + 40, "<Q", 500), "not after"),
    (corrupt(GOOD, 64 + 40, "<Q", 1000), "not after"),
    (corrupt(GOOD, 64 + 80, "<Q", 1000 + 1001 + 20000), "over the maximum"),
    (corrupt(GOOD, len(GOOD) - 8, "<Q", 1), "tail"),
    (corrupt(GOOD, len(GOOD) - 16, "<Q", 999), "tail size"),
    (GOOD + b"\0" * 40, "tail"),
    (GOOD + b"x", "truncated"),
])
def test_malformed_rejected(data, why):
    with pytest.raises(IndexFormatError, match=why):
        parse_index(data, "x.caibx")


def test_error_names_the_file():
    with pytest.raises(IndexFormatError, match=r"^broken\.caibx: "):
        parse_index(b"junk", "broken.caibx")


def test_chunk_ids_are_typed():
    index = sample_index(1)
    chunk = parse_index(index.to_bytes()).chunks[0]
    assert isinstance(chunk.id, ChunkId)
    assert str(chunk.id) == chunk.id.hex() and len(str(chunk.id)) == 64
    assert chunk.id.prefix == str(chunk.id)[:4]


def test_chunk_id_validation():
    with pytest.raises(ValueError):
        ChunkId("abc")
    with pytest.raises(ValueError):
        ChunkId(b"short")
    assert ChunkId("00" * 32) == bytes(32)
