"""Files and trees written and removed so that a crash leaves the old state or none: temporary
names then rename, and removal that works at any depth."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
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
    removed: list[str] = []
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


OPEN_DIRECTORIES = 64  # directory descriptors a walk of any depth holds at once
DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeMoved(OSError):
    """A directory a walk had to reopen through `..` is no longer the one it left."""


def identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of an open file: what a reopened directory is checked against."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def reopen_parent(child_fd: int, identity: tuple[int, int]) -> int:
    """The directory above `child_fd`, reopened through `..` after a deep walk closed it, checked to
    be the one it was ((st_dev, st_ino)): a tree renamed meanwhile is an error, never a wrong write."""
    fd = os.open("..", DIR_OPEN, dir_fd=child_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != identity:
        os.close(fd)
        raise TreeMoved(0, "moved while being walked")
    return fd


def remove_tree(path: str | bytes, dir_fd: int | None = None) -> None:
    """Remove a directory and everything in it, like `rm -rf`, at any depth: no recursion, at most
    OPEN_DIRECTORIES descriptors, no symlink followed; our own read-only directories are made
    writable first (a half-extracted tree has some)."""
    top = os.open(path, DIR_OPEN, dir_fd=dir_fd)
    levels = [_RemoveLevel(top, b"")]
    try:
        while levels:
            level = levels[-1]
            assert level.fd is not None
            if level.names:
                name = level.names.pop()
                if not _unlink_entry(level.fd, name):
                    levels.append(_RemoveLevel(os.open(name, DIR_OPEN, dir_fd=level.fd), name))
                    far = levels[-1 - OPEN_DIRECTORIES] if len(levels) > OPEN_DIRECTORIES else None
                    if far is not None and far.fd is not None:
                        os.close(far.fd)
                        far.fd = None
                continue
            levels.pop()
            if levels:
                parent = levels[-1]
                if parent.fd is None:
                    parent.fd = reopen_parent(level.fd, parent.identity)
                os.close(level.fd)
                level.fd = None
                os.rmdir(level.name, dir_fd=parent.fd)
            else:
                os.close(level.fd)
                level.fd = None
    finally:
        for level in levels:
            if level.fd is not None:
                os.close(level.fd)
    os.rmdir(path, dir_fd=dir_fd)


class _RemoveLevel:
    """A directory being emptied by remove_tree: its descriptor (None while closed for depth), its
    identity for reopening, and the names still in it."""

    __slots__ = ("fd", "identity", "name", "names")

    def __init__(self, fd: int, name: bytes):
        self.fd: int | None = fd
        self.name = name
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        if st.st_uid == os.geteuid() and st.st_mode & 0o700 != 0o700:
            with contextlib.suppress(OSError):
                os.fchmod(fd, (st.st_mode & 0o7777) | 0o700)
        self.names = [os.fsencode(n) for n in os.listdir(fd)]


def _unlink_entry(dir_fd: int, name: bytes) -> bool:
    """Remove a non-directory; False if `name` is a directory (to be emptied first)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except (IsADirectoryError, PermissionError) as e:
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                return False
        except FileNotFoundError:
            return True
        raise e from None
    return True
