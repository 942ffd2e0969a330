"""Parallel part chunking equals sequential chunking, for every number of parts and any data."""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle_cuts
from procutil import HANG_GUARD

from pydesync.chunker import ChunkSizes, InputShrank
from pydesync.digest import digest_of
from pydesync.make import chunk_file, chunk_stream
from pydesync.store import LocalStore

SIZES = ChunkSizes(256, 1024, 4096)


def sequential(data: bytes, sizes: ChunkSizes) -> bytes:
    index, _ = chunk_stream(io.BytesIO(data), sizes, concurrency=1)
    return index.to_bytes()


def parallel(path: Path, sizes: ChunkSizes, parts: int, store=None):
    fd = os.open(path, os.O_RDONLY)
    try:
        return chunk_file(fd, path.stat().st_size, sizes, store=store, parts=parts)
    finally:
        os.close(fd)


def mixed(rng: random.Random, pieces: list[tuple[str, int]]) -> bytes:
    out = bytearray()
    for kind, n in pieces:
        out += bytes(n) if kind == "zero" else (b"ab" * n)[:n] if kind == "repeat" else rng.randbytes(n)
    return bytes(out)


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 10, 33])
@pytest.mark.parametrize("shape", ["random", "zeros", "leading-zeros", "trailing-zeros", "middle-zeros",
                                   "spread-zeros", "repeat"])
def test_parallel_equals_sequential(tmp_path: Path, parts: int, shape: str):
    rng = random.Random(f"{shape}-{parts}")
    size = 200_003  # odd on purpose: part bounds never fall on multiples of max
    layouts = {
        "random": [("rand", size)],
        "zeros": [("zero", size)],
        "leading-zeros": [("zero", 90_001), ("rand", size - 90_001)],
        "trailing-zeros": [("rand", 70_007), ("zero", size - 70_007)],
        "middle-zeros": [("rand", 50_000), ("zero", 100_000), ("rand", size - 150_000)],
        "spread-zeros": [("rand" if i % 2 else "zero", 10_000) for i in range(20)] + [("rand", 3)],
        "repeat": [("repeat", size)],
    }
    data = mixed(rng, layouts[shape])
    path = tmp_path / "blob"
    path.write_bytes(data)
    index, stats = parallel(path, SIZES, parts)
    assert index.to_bytes() == sequential(data, SIZES)
    ends = [c.end for c in index]
    assert ends == oracle_cuts(data, SIZES.min, SIZES.avg, SIZES.max)
    assert stats.chunks_produced >= len(index)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), parts=st.integers(1, 12),
       layout=st.lists(st.tuples(st.sampled_from(["rand", "zero", "repeat"]), st.integers(1, 30_000)),
                       min_size=1, max_size=6))
def test_property_parallel_equals_sequential(tmp_path: Path, seed: int, parts: int, layout):
    data = mixed(random.Random(seed), layout)
    path = tmp_path / f"blob-{seed}-{parts}"
    path.write_bytes(data)
    index, _ = parallel(path, SIZES, parts)
    assert index.to_bytes() == sequential(data, SIZES)
    path.unlink()


def test_store_holds_exactly_the_index_chunks(tmp_path: Path):
    """Speculative chunks of parts that the join replaced are not left in the store."""
    rng = random.Random(5)
    data = rng.randbytes(300_001)
    path = tmp_path / "blob"
    path.write_bytes(data)
    store = LocalStore(tmp_path / "store", create=True)
    index, stats = parallel(path, SIZES, 7, store=store)
    assert set(store.ids()) == {c.id for c in index}
    assert stats.chunks_stored == len({c.id for c in index})
    assert all(store.get(c.id) == data[c.start:c.end] for c in index)


def test_null_chunks_are_named_without_hashing(tmp_path: Path):
    path = tmp_path / "zeros"
    path.write_bytes(bytes(10 * SIZES.max + 17))
    index, _ = parallel(path, SIZES, 3)
    null = digest_of(bytes(SIZES.max))
    assert [c.id for c in index][:10] == [null] * 10
    assert index.chunks[-1].size == 17


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    index, _ = parallel(path, SIZES, 4)
    assert len(index) == 0


class _Truncating(LocalStore):
    """A store whose first write cuts the input file short: the file changing under make."""

    def __init__(self, path: Path, victim: Path, keep: int):
        super().__init__(path, create=True)
        self.victim, self.keep = victim, keep

    def put(self, chunk_id, data) -> None:
        if self.victim.stat().st_size > self.keep:
            os.truncate(self.victim, self.keep)
        super().put(chunk_id, data)


def test_an_input_cut_short_while_chunked_is_one_clear_error(tmp_path: Path):
    """The file is read through maps of one window at a time; one that shrinks under make fails
    the next window's mapping with InputShrank (not a SIGBUS later, not a short index)."""
    path = tmp_path / "input"
    path.write_bytes(random.Random(3).randbytes(24 << 20))
    store = _Truncating(tmp_path / "store", path, keep=6 << 20)  # the first 4 MiB window stays whole
    with pytest.raises(InputShrank, match="changed size while it was being read"):
        parallel(path, ChunkSizes(16 * 1024, 64 * 1024, 256 * 1024), 1, store=store)


class _Rendezvous(LocalStore):
    """A store on a network (remote): the first has() calls wait until `width` of them are waiting
    at once (`met`); later ones go straight through."""

    remote = True

    def __init__(self, path: Path, width: int):
        super().__init__(path, create=True)
        self.barrier = threading.Barrier(width, timeout=HANG_GUARD)
        self.met = False

    def has(self, chunk_id) -> bool:
        if not self.met:
            with contextlib.suppress(threading.BrokenBarrierError):
                self.barrier.wait()
                self.met = True
        return super().has(chunk_id)


def test_a_network_store_gets_requests_in_parallel(tmp_path: Path):
    """make of a file into a network store keeps -n requests going, not one per chunking thread:
    four has() calls meet at once (with two they would wait for the hang guard and fail)."""
    path = tmp_path / "input"
    data = random.Random(4).randbytes(2 << 20)
    path.write_bytes(data)
    store = _Rendezvous(tmp_path / "store", 4)
    fd = os.open(path, os.O_RDONLY)
    try:
        index, stats = chunk_file(fd, len(data), ChunkSizes(16 * 1024, 64 * 1024, 256 * 1024), store=store,
                                  parts=1, concurrency=8)
    finally:
        os.close(fd)
    assert store.met
    assert stats.chunks_stored == len(set(c.id for c in index)) > 8
    with open(path, "rb") as f:
        assert index.to_bytes() == chunk_stream(f, ChunkSizes(16 * 1024, 64 * 1024, 256 * 1024))[0].to_bytes()
