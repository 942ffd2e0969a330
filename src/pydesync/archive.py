"""Archives end to end: pack a tree into a .catar or into chunks + a .caidx.

Data flows one way: tree -> encoder -> (file | chunker -> hasher -> compressor -> store).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import BinaryIO

from .catar.encoder import TreeEncoder
from .chunker import DEFAULT_SIZES, ChunkSizes
from .digest import SHA512_256, hasher
from .errors import PydesyncError
from .fsutil import atomic_write
from .index import Index
from .indexstore import write_index_at
from .make import MakeStats, chunk_stream
from .parallel import DEFAULT_CONCURRENCY
from .store.base import Store
from .store.options import StoreOptions
from .streams import IterReader


def _check_source(source: str) -> None:
    if not os.path.exists(source):
        raise PydesyncError(f"{source} does not exist")
    if not os.path.isdir(source):
        raise PydesyncError(f"{source} is not a directory")


def tar_to_file(source: str | TreeEncoder, output: str, flags: int,
                progress: Callable[[int], None] | None = None,
                warn: Callable[[str], None] | None = None) -> int:
    """Write the catar of `source` (a directory, or an encoder such as TarInputEncoder) to
    `output` (atomically; `-` = stdout); returns its size. `progress` is told the bytes written,
    `warn` what casync could not read back."""
    encoder = _encoder(source, flags, warn)
    try:
        with atomic_write(output) as f:
            for piece in encoder:
                f.write(piece)
                if progress is not None:
                    progress(len(piece))
    except OSError as e:
        raise PydesyncError(f"cannot write {output}: {e.strerror}") from None
    return encoder.offset


def tar_to_index(source: str | TreeEncoder, index_path: str, store: Store, flags: int,
                 sizes: ChunkSizes = DEFAULT_SIZES, digest: str = SHA512_256,
                 concurrency: int = DEFAULT_CONCURRENCY,
                 progress: Callable[[int], None] | None = None,
                 index_options: StoreOptions | None = None,
                warn: Callable[[str], None] | None = None) -> tuple[Index, MakeStats]:
    """Chunk the catar of `source` (as in tar_to_file) into `store` and write its .caidx (flags =
    the archive's) to a path, `-` or an index store URL (written with `index_options`)."""
    reader: BinaryIO = IterReader(_encoder(source, flags, warn))  # type: ignore[assignment]  # (reads as a binary file does)
    index, stats = chunk_stream(reader, sizes, digest, store, concurrency, flags=flags, progress=progress)
    write_index_at(index, index_path, index_options, store)
    return index, stats


def _encoder(source: str | TreeEncoder, flags: int, warn: Callable[[str], None] | None) -> TreeEncoder:
    if isinstance(source, TreeEncoder):
        return source
    _check_source(source)
    return TreeEncoder(source, flags, warn)


def stream_digest(pieces: Iterable[bytes], digest: str = SHA512_256) -> str:
    """casync's digest of a byte stream (archive, blob): the chunk digest over all of it."""
    h = hasher(digest)()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


__all__ = ["stream_digest", "tar_to_file", "tar_to_index"]
