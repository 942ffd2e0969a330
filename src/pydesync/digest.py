"""Chunk ids: SHA512/256 (casync's default) or SHA256, and the ChunkId type."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from .errors import UsageError

SHA512_256 = "sha512-256"
SHA256 = "sha256"
DIGESTS = (SHA512_256, SHA256)

# Index/catar feature flag that selects SHA512/256 (clear means SHA256).
FLAG_SHA512_256 = 0x2000000000000000


class ChunkId(bytes):
    """A 32-byte chunk digest that prints as 64 lowercase hex characters."""

    __slots__ = ()

    def __new__(cls, value: bytes | str) -> ChunkId:
        if isinstance(value, str):
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"invalid chunk id {value!r}") from None
        else:
            raw = bytes(value)
        if len(raw) != 32:
            raise ValueError(f"invalid chunk id {value!r}: must be 32 bytes")
        return super().__new__(cls, raw)

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"ChunkId({self.hex()!r})"

    @property
    def prefix(self) -> str:
        """The 4-hex-digit directory a store files this chunk under."""
        return self.hex()[:4]


def check_digest(name: str) -> str:
    """Validate a --digest value as desync does."""
    if name not in DIGESTS:
        raise UsageError(f"invalid digest algorithm '{name}'")
    return name


def hasher(name: str) -> Callable[..., Any]:
    """Return a hashlib constructor for the digest name."""
    check_digest(name)
    if name == SHA256:
        return hashlib.sha256
    return lambda data=b"": hashlib.new("sha512_256", data)


try:  # OpenSSL's constructor directly: skips hashlib.new's Python wrapper (many small chunks)
    from _hashlib import new as _openssl_new
except ImportError:  # pragma: no cover - Python built without OpenSSL
    _openssl_new = hashlib.new  # type: ignore[assignment]  # (typeshed names the data argument differently)


def digest_of(data: bytes | memoryview, name: str = SHA512_256) -> ChunkId:
    """The chunk id of `data` (hashlib releases the GIL for large inputs)."""
    if name == SHA256:
        return ChunkId(hashlib.sha256(data).digest())
    return ChunkId(_openssl_new("sha512_256", data).digest())


def digest_from_flags(flags: int) -> str:
    """Digest an index's feature flags select."""
    return SHA512_256 if flags & FLAG_SHA512_256 else SHA256


def other_digest(name: str) -> str:
    return SHA256 if name == SHA512_256 else SHA512_256


_null_ids: dict[tuple[int, str], ChunkId] = {}


def null_chunk_id(size: int, digest: str) -> ChunkId:
    """Id of `size` zero bytes (the 'null chunk' of all-zero regions), cached."""
    key = (size, digest)
    if key not in _null_ids:
        _null_ids[key] = digest_of(bytes(size), digest)
    return _null_ids[key]
