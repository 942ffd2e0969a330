"""SipHash-2-4 in C: the hash of entry names in catar goodbye tables."""

from _typeshed import ReadableBuffer

def siphash24(key: ReadableBuffer, data: ReadableBuffer, /) -> int:
    """64-bit SipHash-2-4 of data under a 16-byte key (ValueError for any other key length)."""
