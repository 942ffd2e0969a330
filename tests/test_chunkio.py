"""The native per-chunk path (_chunkio): the same ids as Python, and stored chunks written only
when they are exactly right; everything else deferred to the ordinary path, whose errors name it."""

from __future__ import annotations

import gzip
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from conftest import need, no_stray_files
from hypothesis import given, settings
from hypothesis import strategies as st
from procutil import free_port, stop, wait_listening

from pydesync import chunkio
from pydesync.chunker import ChunkSizes, chunk_bytes
from pydesync.chunkio import Placement, chunk_ids, place_file, place_stored
from pydesync.codec import MAX_ENCODED_CHUNK, compress
from pydesync.digest import SHA256, SHA512_256, digest_of
from pydesync.errors import ChunkInvalid
from pydesync.extract import extract
from pydesync.index import Index
from pydesync.store import LocalStore, open_store

SIZES = ChunkSizes(256, 1024, 4096)
DATA = random.Random(7).randbytes(5000)
ID = digest_of(DATA)


def native_or_skip() -> None:
    need(chunkio.native(), "pydesync was built without _chunkio (OpenSSL's and libzstd's headers)")


def test_native_path_is_built():
    """CI builds it (scripts/test installs libssl-dev and libzstd-dev): losing it is a failure."""
    native_or_skip()


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.tuples(st.sampled_from(["zero", "random"]), st.integers(1, 9000)), max_size=8),
       digest=st.sampled_from([SHA512_256, SHA256]), seed=st.integers(0, 2**32))
def test_chunk_ids_are_the_ids_python_computes(pieces, digest, seed):
    native_or_skip()
    rng = random.Random(seed)
    data = b"".join(bytes(n) if kind == "zero" else rng.randbytes(n) for kind, n in pieces)
    cuts = [end for _start, end in chunk_bytes(data, SIZES)]
    zero_id = digest_of(bytes(SIZES.max), digest)
    expected = [digest_of(data[a:b], digest) for a, b in chunk_bytes(data, SIZES)]
    assert chunk_ids(data, 0, cuts, digest, SIZES.max, zero_id) == expected
    # the fallback gives the same
    saved = chunkio._chunkio
    chunkio._chunkio = None
    try:
        assert chunk_ids(data, 0, cuts, digest, SIZES.max, zero_id) == expected
    finally:
        chunkio._chunkio = saved


def test_chunk_ids_refuse_cuts_outside_the_buffer():
    native_or_skip()
    with pytest.raises(ValueError):
        chunk_ids(b"abc", 0, [2, 1], SHA512_256, 4096, ID)
    with pytest.raises(ValueError):
        chunk_ids(b"abc", 0, [4], SHA512_256, 4096, ID)


@pytest.fixture
def target(tmp_path: Path):
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 20000)
    yield fd, tmp_path / "out"
    os.close(fd)


def frames() -> dict[str, bytes]:
    return {
        "with size": zstandard.ZstdCompressor(level=3).compress(DATA),
        "casync's, no size": zstandard.ZstdCompressor(write_content_size=False).compress(DATA),
    }


@pytest.mark.parametrize("kind", ["with size", "casync's, no size", "plain"])
def test_a_good_chunk_is_written_at_every_place(target, kind):
    native_or_skip()
    fd, path = target
    stored = DATA if kind == "plain" else frames()[kind]
    assert place_stored(stored, kind != "plain", ID, SHA512_256, True, Placement(fd, len(DATA), [0, 12000]))
    out = path.read_bytes()
    assert out[:5000] == DATA and out[12000:17000] == DATA and out[5000:12000] == bytes(7000)


def bad_chunks() -> dict[str, tuple[bytes, bool]]:
    good = frames()["with size"]
    other = random.Random(8).randbytes(5000)
    return {
        "another chunk": (compress(other), True),
        "wrong id, no size": (zstandard.ZstdCompressor(write_content_size=False).compress(other), True),
        "too long": (compress(DATA + b"x"), True),
        "too long, no size": (zstandard.ZstdCompressor(write_content_size=False).compress(DATA + b"x"), True),
        "too short, no size": (zstandard.ZstdCompressor(write_content_size=False).compress(DATA[:-1]), True),
        "trailing garbage": (good + b"junk", True),
        "a second frame": (good + compress(b""), True),
        "truncated": (good[:-3], True),
        "xz": (lzma.compress(DATA, format=lzma.FORMAT_XZ), True),
        "gzip": (gzip.compress(DATA), True),
        "garbage": (b"\x28\xb5\x2f\xfd" + bytes(40), True),
        "empty": (b"", True),
        "plain, wrong length": (DATA[:-1], False),
        "plain, wrong bytes": (b"y" + DATA[1:], False),
        "a bomb": (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 24)), True),
    }


@pytest.mark.parametrize("name", list(bad_chunks()))
def test_anything_else_is_deferred_and_nothing_written(target, name):
    native_or_skip()
    fd, path = target
    stored, compressed = bad_chunks()[name]
    assert not place_stored(stored, compressed, ID, SHA512_256, True, Placement(fd, len(DATA), [0]))
    assert path.read_bytes() == bytes(20000)


def test_unverified_chunks_are_written_as_they_decode(target):
    """skip-verify in the store options: the id is not checked (the size still is)."""
    native_or_skip()
    fd, path = target
    other = random.Random(8).randbytes(5000)
    assert place_stored(compress(other), True, ID, SHA512_256, False, Placement(fd, 5000, [0]))
    assert path.read_bytes()[:5000] == other


def test_chunk_files(target, tmp_path: Path):
    native_or_skip()
    fd, path = target
    placement = Placement(fd, len(DATA), [100])

    def place(name: str, limit: int = MAX_ENCODED_CHUNK) -> bool | None:
        return place_file(str(tmp_path / name), limit, True, ID, SHA512_256, True, placement)
    (tmp_path / "chunk").write_bytes(compress(DATA))
    (tmp_path / "link").symlink_to(tmp_path / "chunk")
    (tmp_path / "dir").mkdir()
    assert place("absent") is None
    assert place("link") is None
    assert place("dir") is False
    assert place("chunk", limit=10) is False
    assert path.read_bytes() == bytes(20000)
    assert place("chunk") is True
    assert path.read_bytes()[100:5100] == DATA


def test_a_failed_write_is_an_oserror(tmp_path: Path):
    native_or_skip()
    (tmp_path / "out").write_bytes(b"")
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            place_stored(compress(DATA), True, ID, SHA512_256, True, Placement(fd, len(DATA), [0]))
    finally:
        os.close(fd)


def mixed_store(tmp_path: Path, plain: bool = True) -> tuple[Index, bytes, Path]:
    """A store whose chunks come in every form a reader meets: our zstd, casync's zstd frames,
    xz, gzip, and (a local store's fallback) one plain, suffix-less chunk."""
    data = random.Random(9).randbytes(60000)
    store = LocalStore(tmp_path / "store", create=True)
    index = Index(sizes=SIZES)
    forms = [lambda d: compress(d), lambda d: zstandard.ZstdCompressor(write_content_size=False).compress(d),
             lambda d: lzma.compress(d, format=lzma.FORMAT_XZ), lambda d: gzip.compress(d)]
    for n, (a, b) in enumerate(chunk_bytes(data, SIZES)):
        piece = data[a:b]
        chunk_id = digest_of(piece)
        index.append(chunk_id, len(piece))
        if n == 3 and plain:
            Path(store.chunk_path(chunk_id, compressed=False)).parent.mkdir(exist_ok=True)
            Path(store.chunk_path(chunk_id, compressed=False)).write_bytes(piece)
        else:
            path = Path(store.chunk_path(chunk_id))
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(forms[n % len(forms)](piece))
    return index, data, tmp_path / "store"


def test_extract_takes_every_form_of_chunk(tmp_path: Path):
    index, data, store = mixed_store(tmp_path)
    extract(index, str(tmp_path / "out"), LocalStore(store))
    assert (tmp_path / "out").read_bytes() == data


def test_extract_over_http_takes_every_form_of_chunk(tmp_path: Path):
    """Bodies from a plain web server: native where it can, the ordinary decoders elsewhere."""
    index, data, store = mixed_store(tmp_path, plain=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)], cwd=store,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_listening(proc, port)
        http = open_store(f"http://127.0.0.1:{port}/")
        try:
            extract(index, str(tmp_path / "out"), http, concurrency=2)
        finally:
            http.close()
    finally:
        stop(proc)
    assert (tmp_path / "out").read_bytes() == data


def test_a_damaged_chunk_is_named_and_no_output_appears(tmp_path: Path):
    index, _data, store = mixed_store(tmp_path)
    bad = index.chunks[4]
    Path(LocalStore(store).chunk_path(bad.id)).write_bytes(compress(b"not this chunk"))
    with pytest.raises(ChunkInvalid, match=str(bad.id)):
        extract(index, str(tmp_path / "out"), LocalStore(store))
    assert not (tmp_path / "out").exists()
    assert no_stray_files(tmp_path, {"store"}) == []  # (the partial, kept for a rerun, may be)
