"""The C chunker against the pure-Python oracle, casync's parameters and edge cases."""

from __future__ import annotations

import io
import random

import pytest
from conftest import SHARED, need
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import TABLE, oracle_cuts, spec_table, window_hash

from pydesync import _chunker
from pydesync.chunker import ChunkSizes, chunk_bytes, discriminator, find_cuts, iter_chunks
from pydesync.errors import UsageError


def c_cuts(data: bytes, sizes: ChunkSizes) -> list[int]:
    return find_cuts(data, 0, len(data), sizes, True)


def test_table_matches_spec():
    spec = SHARED / "spec"
    need(spec.is_dir(), f"spec not found at {spec}")
    assert spec_table(spec) == TABLE
    assert TABLE[0] == 0x458BE752 and TABLE[-1] == 0xD95DDF11


@pytest.mark.parametrize("avg,expected", [(16384, 12318), (65536, 49535), (1048576, 886711), (8192, 6153)])
def test_discriminator_values(avg, expected):
    assert discriminator(1, avg, 128 * 1024 * 1024) == expected


def test_discriminator_is_clamped():
    assert discriminator(100, 128, 130) == 100  # raw value 96 < min
    assert discriminator(1, 1000, 1000) == 750  # 1000 / 1.3322... truncated
    # For a huge avg the formula's denominator goes negative; the clamp lifts it to min.
    assert discriminator(4096, 128 * 1024 * 1024, 128 * 1024 * 1024) == 4096


def test_c_window_hash_equals_oracle():
    rng = random.Random(1)
    for _ in range(50):
        window = rng.randbytes(48)
        assert _chunker.buzhash(window) == window_hash(window)


def test_rolling_hash_equals_from_scratch():
    rng = random.Random(2)
    data = rng.randbytes(400)
    from oracle import rol32

    h = window_hash(data[:48])
    for i in range(48, len(data)):
        h = rol32(h, 1) ^ rol32(TABLE[data[i - 48]], 48) ^ TABLE[data[i]]
        assert h == window_hash(data[i - 47: i + 1])


SIZES = [
    ChunkSizes(16384, 65536, 262144),
    ChunkSizes(48, 1024, 65536),
    ChunkSizes(100, 128, 130),       # discriminator clamped to min
    ChunkSizes(1000, 8192, 8193),
    ChunkSizes(4096, 4096, 4096),    # fixed size
    ChunkSizes(1, 64, 256),          # min below the window: effective min 48
    ChunkSizes(1, 2, 4),             # max below the window: only forced cuts
    ChunkSizes(1, 1, 1),
    ChunkSizes(64, 256, 1024),
]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_c_equals_oracle_on_random_data(sizes):
    data = random.Random(str(sizes)).randbytes(40_000 if sizes.max > 4096 else 5_000)
    assert c_cuts(data, sizes) == oracle_cuts(data, sizes.min, sizes.avg, sizes.max)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=6000),
       min_size=st.integers(1, 300), spread=st.integers(0, 600), top=st.integers(0, 900))
def test_property_c_equals_oracle(data, min_size, spread, top):
    avg = min_size + spread
    sizes = ChunkSizes(min_size, avg, avg + top)
    assert c_cuts(data, sizes) == oracle_cuts(data, sizes.min, sizes.avg, sizes.max)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), length=st.integers(0, 20000), block=st.integers(1, 5000),
       low_entropy=st.booleans())
def test_property_boundaries_do_not_depend_on_reads(seed, length, block, low_entropy):
    rng = random.Random(seed)
    data = bytes(rng.choice(b"ab\x00") for _ in range(length)) if low_entropy else rng.randbytes(length)
    sizes = ChunkSizes(64, 256, 1024)
    expected = oracle_cuts(data, 64, 256, 1024)

    class Trickle(io.RawIOBase):
        """Returns at most `block` bytes per read, like a pipe."""

        def __init__(self):
            self.pos = 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), block, len(data) - self.pos)
            b[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    got = [off + len(v) for off, v in iter_chunks(Trickle(), sizes, block_size=block)]
    assert got == expected


def test_cut_at_exactly_min_is_allowed():
    """casync tests the boundary at L == min (desync's snapshot does not): find such a spot."""
    sizes = ChunkSizes(64, 256, 1024)
    d = sizes.discriminator
    rng = random.Random(7)
    while True:
        window = rng.randbytes(48)
        if window_hash(window) % d == d - 1:
            break
    data = rng.randbytes(16) + window + rng.randbytes(2000)
    assert c_cuts(data, sizes)[0] == 64


def test_forced_cuts_on_zeros():
    sizes = ChunkSizes()
    data = bytes(600000)
    assert [e - s for s, e in chunk_bytes(data, sizes)] == [262144, 262144, 75712]


def test_empty_and_tiny_inputs():
    sizes = ChunkSizes()
    assert c_cuts(b"", sizes) == []
    assert c_cuts(b"x", sizes) == [1]
    assert list(iter_chunks(io.BytesIO(b""), sizes)) == []


def test_not_final_leaves_undecided_tail():
    sizes = ChunkSizes(64, 256, 1024)
    data = random.Random(3).randbytes(5000)
    full = c_cuts(data, sizes)
    partial = find_cuts(data, 0, 3000, sizes, False)
    assert partial == [c for c in full if c <= 3000][: len(partial)]
    assert all(c <= 3000 for c in partial)


def test_iter_chunks_limit():
    data = random.Random(4).randbytes(10000)
    sizes = ChunkSizes(64, 256, 1024)
    got = b"".join(bytes(v) for _, v in iter_chunks(io.BytesIO(data), sizes, limit=4321))
    assert got == data[:4321]


def test_find_cuts_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _chunker.find_cuts(b"abc", 0, 10, 1, 2, 1, True)
    with pytest.raises(ValueError):
        _chunker.find_cuts(b"abc", 0, 3, 0, 2, 1, True)


@pytest.mark.parametrize("spec,expected", [
    ("16:64:256", (16384, 65536, 262144)),
    ("2:8:32", (2048, 8192, 32768)),
    ("64", (16384, 65536, 262144)),
    ("4:4:4", (4096, 4096, 4096)),
])
def test_parse_kib(spec, expected):
    s = ChunkSizes.parse_kib(spec)
    assert (s.min, s.avg, s.max) == expected


@pytest.mark.parametrize("spec", ["", "a:b:c", "1:2", "64:16:256", "16:64:32", "0:0:0", "1:2:200000"])
def test_parse_kib_rejects(spec):
    with pytest.raises(UsageError):
        ChunkSizes.parse_kib(spec)


def test_fill_like_casync():
    assert ChunkSizes.fill(avg=65536) == ChunkSizes(16384, 65536, 262144)
    assert ChunkSizes.fill(min_size=1024, max_size=16384).avg == 4096
    assert ChunkSizes.fill() == ChunkSizes()
