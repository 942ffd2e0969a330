"""Files written so that a crash leaves the old file or none: temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

STALE_AFTER = 60.0  # seconds untouched before a dead writer's temporary file is removed


def temp_name_for(path: str) -> str:
    """A hidden temporary name beside `path` (`.<name>.<pid>-<random>.tmp`), after removing those
    that earlier writers of `path` left when they were killed (see remove_stale_temps)."""
    folder, base = os.path.split(os.path.abspath(path))
    remove_stale_temps(folder, base)
    return os.path.join(folder, f".{base}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


def remove_stale_temps(folder: str, base: str) -> list[str]:
    """Remove the temporary files of `base` whose writer is gone: kill -9 or a power cut leave
    them, and an image-sized file each time adds up. A file is stale when the pid in its name is
    not a live process here and it has not been written to for STALE_AFTER seconds (a writer in
    another pid namespace is still writing). Returns the names removed."""
    prefix = f".{base}."
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMP_TAIL.fullmatch(name[len(prefix):])
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if now - os.lstat(path).st_mtime > STALE_AFTER:
                os.unlink(path)
                removed.append(name)
    return removed


_TEMP_TAIL = re.compile(r"(\d+)-[0-9a-f]{12}\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


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
