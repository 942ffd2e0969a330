"""untar's batched writer of new regular files in C (GIL released once per batch)."""

from collections.abc import Sequence
from typing import TypeAlias

from _typeshed import ReadableBuffer

# One file: dir_fd, temp name, final name, contents, mode, mtime_ns (< 0: leave the time alone).
_NewFile: TypeAlias = tuple[int, bytes, bytes, ReadableBuffer, int, int]

def write_new_files(items: Sequence[_NewFile], umask: int, /) -> tuple[int, int] | None:
    """Create, fill, stamp and rename each file in order; None, or (index, errno) of the first failure."""
