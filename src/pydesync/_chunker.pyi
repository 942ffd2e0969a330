"""Content-defined chunkers' scan loops in C: casync's buzhash and CAFS's rolling sum."""

from _typeshed import ReadableBuffer

def find_cuts(
    buffer: ReadableBuffer, start: int, end: int, min: int, max: int, discriminator: int, final: bool, /
) -> list[int]:
    """End offsets of every buzhash chunk from `start` decidable within buffer[:end] (all of it if final)."""

def buzhash(window: ReadableBuffer, /) -> int:
    """Buzhash of one 48-byte window, for checking the table and the rolling update in tests."""

def is_zero(buffer: ReadableBuffer, /) -> bool:
    """Whether every byte is zero, so all-zero chunks are found without hashing them."""

def cafs_cuts(buffer: ReadableBuffer, start: int, /) -> list[int]:
    """End offsets of every CAFS chunk from `start` decidable within buffer (remotesync's CAFS mode)."""
