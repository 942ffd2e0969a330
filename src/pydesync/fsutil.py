"""Files written so that a crash leaves the old file or none: temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from typing import BinaryIO


def temp_name_for(path: str) -> str:
    """A hidden temporary name beside `path` (desync's `.<name><random>`)."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds.

    `-` means standard output (written directly; nothing to rename).
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    temp = temp_name_for(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)
