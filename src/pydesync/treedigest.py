"""casync's `digest`: one SHA-512/256 (or SHA-256) over a tree's archive stream or a blob.

What `casync digest` prints, by input:

* a directory: the digest of its catar stream for the chosen feature flags;
  the digest bit of the flags (`--digest`) picks the hash and is part of the
  stream;
* a .catar, or the archive a .caidx describes: the digest of the archive bytes
  with the hash the archive's own feature flags select (casync decodes the
  archive, so a malformed one is an error, not a digest);
* a blob file, or the blob a .caibx describes: the digest of its bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from .archive import stream_digest
from .blobreader import BlobReader
from .catar import format as F
from .catar.decoder import ArchiveDecoder, Readable
from .catar.encoder import TreeEncoder
from .digest import SHA256, SHA512_256, hasher
from .errors import PydesyncError
from .index import Index
from .parallel import DEFAULT_CONCURRENCY
from .store.base import Store
from .streams import IterReader

BLOCK = 1 << 20


def flags_digest(flags: int) -> str:
    """The hash an archive's feature flags select."""
    return SHA512_256 if flags & F.SHA512_256 else SHA256


def directory_digest(root: str | os.PathLike[str], flags: int) -> str:
    """Digest of the catar of `root` encoded with `flags` (what `casync digest DIR` prints)."""
    return stream_digest(TreeEncoder(root, flags), flags_digest(F.normalize_flags(flags)))


class _HashingReader:
    """read(n) over `head` then `stream`, feeding every byte read from `stream` into `h`."""

    def __init__(self, head: bytes, stream: Readable, h: Any):
        self._head = memoryview(head)
        self._stream = stream
        self._h = h

    def read(self, n: int) -> bytes:
        if self._head:
            data = bytes(self._head[:n])
            self._head = self._head[len(data):]
            return data
        data = self._stream.read(n)
        self._h.update(data)
        return data


def _read_upto(stream: Readable, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def archive_digest(stream: Readable, name: str = "archive") -> str:
    """Digest of a catar stream, checked by decoding it, with the hash its flags select."""
    head = _read_upto(stream, 16 + F.ENTRY_SIZE)
    flags = F.SHA512_256
    if len(head) >= 24 and F.HEADER.unpack_from(head)[1] == F.ENTRY:
        flags = struct.unpack_from("<Q", head, 16)[0]
    h = hasher(flags_digest(flags))()
    h.update(head)
    for _ in ArchiveDecoder(_HashingReader(head, stream, h), name):
        pass
    return h.hexdigest()


def catar_digest(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return archive_digest(f, os.fspath(path))


def caidx_digest(index: Index, store: Store, concurrency: int = DEFAULT_CONCURRENCY,
                 name: str = "index") -> str:
    """Digest of the archive a .caidx describes, its chunks read from `store`."""
    return archive_digest(IterReader(BlobReader(index, store, concurrency).iter_range()), name)


def caibx_digest(index: Index, store: Store, digest: str = SHA512_256,
                 concurrency: int = DEFAULT_CONCURRENCY) -> str:
    """Digest of the blob a .caibx describes."""
    return stream_digest(BlobReader(index, store, concurrency).iter_range(), digest)


def file_pieces(path: str | os.PathLike[str], block: int = BLOCK) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while piece := f.read(block):
                yield piece
    except IsADirectoryError:
        raise PydesyncError(f"{os.fspath(path)} is a directory") from None


def blob_digest(pieces: Iterable[bytes], digest: str = SHA512_256) -> str:
    """Digest of a blob's bytes."""
    return stream_digest(pieces, digest)


__all__ = ["archive_digest", "blob_digest", "caibx_digest", "caidx_digest", "catar_digest",
           "directory_digest", "file_pieces", "flags_digest"]
