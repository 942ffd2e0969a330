"""A byte stream read from an iterator of byte strings (an encoder's output, an index's chunks)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator


class IterReader(io.RawIOBase):
    """Both read(n) (full reads until the end, for decoders) and readinto (for the chunker)."""

    def __init__(self, pieces: Iterable[bytes]):
        self._pieces: Iterator[bytes] = iter(pieces)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return False
            self._buf = memoryview(piece)
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]  # (a buffer of bytes, as callers pass)
        if not self._next():
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def read(self, n: int = -1) -> bytes:
        out = []
        while n != 0 and self._next():
            take = self._buf if n < 0 else self._buf[:n]
            out.append(bytes(take))
            self._buf = self._buf[len(take):]
            n -= len(take) if n > 0 else 0
        return b"".join(out)
