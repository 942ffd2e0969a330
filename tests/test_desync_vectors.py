"""desync's own test vectors (testdata/desync, see its MANIFEST.md), checked at library level."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import zstandard
from vectors import CHUNKER_TABLE, NULL_CHUNK_32K

from pydesync import ChunkId, ChunkSizes, Index, IndexChunk, LocalStore, chunk_bytes, chunk_stream, digest_of
from pydesync.codec import decompress
from pydesync.index import blob_flags, parse_index

DESYNC_FLAGS = 0xA000000000000000  # what desync writes: SHA512-256 | EXCLUDE_NODUMP
PYDESYNC_FLAGS = 0xB000000000000000  # what casync (and pydesync) write: ... | EXCLUDE_FILE
SIZES_64K = ChunkSizes(16 * 1024, 64 * 1024, 256 * 1024)
SIZES_8K = ChunkSizes(2 * 1024, 8 * 1024, 32 * 1024)
CHUNKER_INPUT_SHA256 = "89252af012ef431f066a87c7ca526d5c1cff372142fe5b05dfe86293e5d0326f"


INDEX_CAIBX_ENTRIES = [
    (0, 242168, "437884da2d1e61cf50b43b263ff15f25a870b0eae84bc22e4b5c307a0428764d"),
    (242168, 75740, "985462e6b3293bbe61e43882686b481751ecf4b285bae4dffc2dfa8829f971ac"),
    (317908, 20012, "fadff4b303624f2be3d0e04c2f105306118a9f608ef1e4f83c1babbd23a2315f"),
]


def without_flags(data: bytes) -> bytes:
    """Index bytes with the feature-flags word (bytes 16..24) blanked."""
    return data[:16] + bytes(8) + data[24:]


@pytest.fixture(scope="module")
def chunker_input(desync_data: Path) -> bytes:
    data = (desync_data / "testdata" / "chunker.input").read_bytes()
    assert len(data) == 1048576
    assert hashlib.sha256(data).hexdigest() == CHUNKER_INPUT_SHA256
    return data


def test_discriminators():
    assert SIZES_64K.discriminator == 49535
    assert SIZES_8K.discriminator == 6153


def test_chunker_input_table(chunker_input: bytes):
    cuts = chunk_bytes(chunker_input, SIZES_64K)
    got = [(start, end - start, str(digest_of(chunker_input[start:end]))) for start, end in cuts]
    assert got == CHUNKER_TABLE
    assert cuts[-1][1] == len(chunker_input)  # then end of stream


def test_chunker_input_streamed_in_small_blocks(chunker_input: bytes):
    """Reading the stream in pieces (block < input) does not move any boundary."""
    index, _stats = chunk_stream(io.BytesIO(chunker_input), SIZES_64K, concurrency=2)
    assert [(c.start, c.size, str(c.id)) for c in index] == CHUNKER_TABLE


def test_chunker_index_bytes(desync_data: Path, chunker_input: bytes):
    expected = (desync_data / "testdata" / "chunker.index").read_bytes()
    assert len(expected) == 904
    index = Index(flags=DESYNC_FLAGS, sizes=SIZES_64K)
    for start, end in chunk_bytes(chunker_input, SIZES_64K):
        index.append(digest_of(chunker_input[start:end]), end - start)
    assert index.to_bytes() == expected
    parsed = parse_index(expected)
    assert parsed.flags == DESYNC_FLAGS
    assert parsed.sizes == SIZES_64K
    assert [(c.start, c.size, str(c.id)) for c in parsed] == CHUNKER_TABLE
    assert int.from_bytes(expected[-16:-8], "little") == 856  # table_size = 16 + 40*20 + 40


def test_chunker_index_via_make_fills_store(desync_data: Path, chunker_input: bytes, tmp_path: Path):
    """pydesync's own make path: same index apart from the flags word, and a store with all 20 chunks."""
    expected = (desync_data / "testdata" / "chunker.index").read_bytes()
    store = LocalStore(tmp_path / "store", create=True)
    index, stats = chunk_stream(io.BytesIO(chunker_input), SIZES_64K, store=store, concurrency=4)
    assert index.flags == PYDESYNC_FLAGS == blob_flags()
    assert without_flags(index.to_bytes()) == without_flags(expected)
    # With desync's flags the bytes are identical.
    assert Index(flags=DESYNC_FLAGS, sizes=index.sizes, chunks=index.chunks).to_bytes() == expected
    assert stats.chunks_stored == 20
    assert sorted(str(i) for i in store.ids()) == sorted(row[2] for row in CHUNKER_TABLE)
    for start, size, cid in CHUNKER_TABLE:
        assert store.get(ChunkId(cid)) == chunker_input[start:start + size]


def test_index_caibx_decode(desync_data: Path):
    data = (desync_data / "testdata" / "index.caibx").read_bytes()
    assert len(data) == 224
    index = parse_index(data)
    assert index.flags == DESYNC_FLAGS
    assert index.sizes == SIZES_64K
    assert index.length == 337920
    assert [(c.start, c.size, str(c.id)) for c in index] == INDEX_CAIBX_ENTRIES
    assert index.chunks == [IndexChunk(s, n, ChunkId(i)) for s, n, i in INDEX_CAIBX_ENTRIES]


def test_index_caibx_roundtrip(desync_data: Path):
    data = (desync_data / "testdata" / "index.caibx").read_bytes()
    assert parse_index(data).to_bytes() == data
    out = io.BytesIO()
    Index.read(io.BytesIO(data)).write_to(out)
    assert out.getvalue() == data
    # Built from scratch with the listed entries.
    built = Index(flags=DESYNC_FLAGS, sizes=SIZES_64K)
    for _start, size, cid in INDEX_CAIBX_ENTRIES:
        built.append(ChunkId(cid), size)
    assert built.to_bytes() == data


@pytest.mark.parametrize("name", ["blob1.caibx", "blob2.caibx"])
def test_cmd_indexes_decode(desync_cmd: Path, name: str):
    data = (desync_cmd / name).read_bytes()
    index = parse_index(data)
    assert len(data) == 6544
    assert index.flags == DESYNC_FLAGS
    assert index.sizes == SIZES_8K
    assert len(index) == 161
    assert len(index.unique_ids()) == 131
    assert index.length == 2097152
    assert sum(1 for c in index if str(c.id) == NULL_CHUNK_32K) == 31
    assert index.to_bytes() == data


def test_null_chunk_id():
    assert str(digest_of(bytes(32768))) == NULL_CHUNK_32K


def test_blob1_rechunked_equals_index(desync_cmd: Path):
    expected = (desync_cmd / "blob1.caibx").read_bytes()
    with open(desync_cmd / "blob1", "rb") as f:
        index, _stats = chunk_stream(f, SIZES_8K, concurrency=4)
    assert index.flags == PYDESYNC_FLAGS
    got = index.to_bytes()
    assert len(got) == len(expected)
    assert without_flags(got) == without_flags(expected)
    assert got[16:24] != expected[16:24]
    nulls = [c for c in index if str(c.id) == NULL_CHUNK_32K]
    assert len(nulls) == 31
    assert (nulls[0].start, nulls[-1].end) == (1077235, 2093043)  # the null-chunk run
    assert (index.chunks[-1].size, str(index.chunks[-1].id)[:12]) == (4109, "b5976e1ad9bc")


def test_blob2_differs_from_blob1_in_seven_chunks(desync_cmd: Path):
    one = parse_index((desync_cmd / "blob1.caibx").read_bytes())
    two = parse_index((desync_cmd / "blob2.caibx").read_bytes())
    assert [(c.start, c.size) for c in one] == [(c.start, c.size) for c in two]
    diff = [c for c, d in zip(one, two, strict=True) if c.id != d.id]
    assert [c.start for c in diff] == [0, 3505, 265848, 325320, 842506, 1040789, 2093043]
    assert sum(c.size for c in diff) == 80029


def _all_chunk_files(root: Path) -> list[Path]:
    found = []
    for folder, _dirs, files in os.walk(root):
        found.extend(Path(folder) / name for name in files if name.endswith(".cacnk"))
    return sorted(found)


def test_every_store_chunk_matches_its_name(desync_data: Path):
    files = _all_chunk_files(desync_data)
    assert len(files) == 419
    dctx = zstandard.ZstdDecompressor()
    for path in files:
        stored = path.read_bytes()
        name = path.name[: -len(".cacnk")]
        assert path.parent.name == name[:4], path
        data = decompress(stored)
        assert hashlib.new("sha512_256", data).hexdigest() == name, path
        # One zstd frame with its content size recorded.
        params = zstandard.get_frame_parameters(stored)
        assert params.content_size == len(data), path
        assert dctx.decompress(stored) == data


@pytest.mark.parametrize("store,index", [("blob1.store", "blob1.caibx"), ("blob2.store", "blob2.caibx")])
def test_store_holds_exactly_the_index_chunks(desync_cmd: Path, store: str, index: str):
    local = LocalStore(desync_cmd / store)
    idx = parse_index((desync_cmd / index).read_bytes())
    assert set(local.ids()) == set(idx.unique_ids())
    assert sum(c.size for c in {c.id: c for c in idx}.values()) == 1114112


def test_blob1_store_shares_124_chunks_with_blob2(desync_cmd: Path):
    one = set(LocalStore(desync_cmd / "blob1.store").ids())
    two = set(LocalStore(desync_cmd / "blob2.store").ids())
    cache = set(LocalStore(desync_cmd / "blob2.cache").ids())
    assert len(one & two) == 124
    assert len(cache) == 25 and cache <= one & two


def test_tree_store_chunk_is_tree_catar(desync_cmd: Path):
    index = parse_index((desync_cmd / "tree.caidx").read_bytes())
    assert index.flags == 0xA000000000001F22
    assert index.sizes == SIZES_64K
    assert [(c.start, c.size, str(c.id)) for c in index] == [
        (0, 1687, "0589328ff916d08f5fe59a9aa0731571448e91341f37ca5484a85b9f0af14de3")]
    store = LocalStore(desync_cmd / "tree.store")
    assert store.get(index.chunks[0].id) == (desync_cmd / "tree.catar").read_bytes()
    assert store.stored_size(index.chunks[0].id) == 475
