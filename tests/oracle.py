"""A slow, obviously-correct pure-Python chunker: the oracle the C scan is tested against.

Written straight from FORMATS.md 1.3/1.4, byte by byte, with no skipping and a
real modulo, so it shares no tricks with the C code.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydesync.chunker import discriminator

_TABLE_H = Path(__file__).resolve().parent.parent / "src" / "pydesync" / "_buzhash_table.h"


def load_table() -> list[int]:
    """casync's table as compiled into the extension (test_chunker checks it against the spec's JSON)."""
    text = _TABLE_H.read_text()
    body = text[text.index("{") + 1: text.index("}")]
    return [int(v.strip().rstrip("U"), 16) for v in body.split(",") if v.strip()]


TABLE = load_table()


def rol32(x: int, n: int) -> int:
    n %= 32
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF if n else x


def window_hash(window: bytes) -> int:
    h = 0
    for i, b in enumerate(window):
        h ^= rol32(TABLE[b], 47 - i)
    return h


def oracle_cuts(data: bytes, min_size: int, avg: int, max_size: int) -> list[int]:
    """End offsets of every chunk, by the rule: cut after byte L iff L >= max, or
    L >= max(min, 48) and H(last 48 bytes of the chunk) mod d == d - 1."""
    d = discriminator(min_size, avg, max_size)
    cuts = []
    start = 0
    h = 0
    for pos in range(len(data)):
        length = pos - start + 1
        if length <= 48:
            h = rol32(h, 1) ^ TABLE[data[pos]]  # window filling: equals the from-scratch hash at 48
        else:
            h = rol32(h, 1) ^ rol32(TABLE[data[pos - 48]], 48) ^ TABLE[data[pos]]
        cut = length >= max_size or (length >= max(min_size, 48) and length >= 48 and h % d == d - 1)
        if cut:
            cuts.append(pos + 1)
            start = pos + 1
            h = 0
    if start < len(data):
        cuts.append(len(data))
    return cuts


def spec_table(spec_dir: Path) -> list[int]:
    return json.loads((spec_dir / "buzhash_table.json").read_text())
