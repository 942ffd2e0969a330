"""A chunk store in a local directory: `<dir>/<4 hex>/<64 hex><extension>`.

The extension comes from the store's converters: `.cacnk` compressed, none
uncompressed, `.<alg>-<keyid>` appended when encrypted (store.converters).

Writes go to a temporary name in the prefix directory and are renamed into
place, so no partial chunk is ever visible and concurrent writers are safe
(they write identical bytes under the same name).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator

from ..chunkio import Placement, place_file
from ..codec import MAX_ENCODED_CHUNK
from ..digest import ChunkId
from ..errors import ChunkMissing, StoreError
from .base import FormattedStore
from .converters import ALGORITHMS, COMPRESSED, PLAIN, Converters
from .options import StoreOptions

SUFFIX = ".cacnk"
TEMP_PREFIX = ".tmp-cacnk"
_CHUNK_ID = re.compile(r"^[0-9a-f]{64}")


def create_store_directory(path: str) -> None:
    """Make a missing store's directory; its parent must exist (the rule for every store kind: a
    typo in a path creates nothing at the root)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StoreError(f"cannot create store {path}: {parent} does not exist")
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise StoreError(f"store {path} is not a directory") from None
    except OSError as e:
        raise StoreError(f"cannot create store {path}: {e.strerror}") from None


class LocalStore(FormattedStore):
    """Chunks in a directory, laid out as casync and desync lay them out."""

    listable = True
    local_files = True

    def __init__(self, path: str | os.PathLike[str], options: StoreOptions | None = None,
                 create: bool = False):
        self.path = os.fspath(path)
        super().__init__(self.path, options)
        if create:
            create_store_directory(self.path)
        if not os.path.exists(self.path):
            raise StoreError(f"store {self.path} does not exist")
        if not os.path.isdir(self.path):
            raise StoreError(f"store {self.path} is not a directory")
        self._suffix = self.converters.extension
        # Formats to look for, own first: casync also reads suffix-less raw chunks (and a plain
        # store compressed ones). An encrypted store sees only its own extension.
        if self.converters.encrypted:
            self._formats: tuple[Converters, ...] = (self.converters,)
        else:
            self._formats = (self.converters, PLAIN if self.converters.compressed else COMPRESSED)

    # ---- paths -----------------------------------------------------------------------------
    def chunk_path(self, chunk_id: ChunkId, compressed: bool | None = None) -> str:
        """Where the chunk lives in the store's own format (or plain / compressed if asked)."""
        if compressed is None:
            return self._path(chunk_id, self._suffix)
        return self._path(chunk_id, SUFFIX if compressed else "")

    def _path(self, chunk_id: ChunkId, extension: str) -> str:
        name = chunk_id.hex()
        return f"{self.path}{os.sep}{name[:4]}{os.sep}{name}{extension}"

    def _candidates(self) -> tuple[Converters, ...]:
        return self._formats

    # ---- reads -----------------------------------------------------------------------------
    def _read(self, path: str) -> bytes | None:
        """The file's bytes, or None if absent (a symlink marks a chunk known to be missing)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            raise StoreError(f"cannot read {path}: {e.strerror}", e.errno) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise StoreError(f"cannot read {path}: is a directory")
            if st.st_size > MAX_ENCODED_CHUNK:  # a shared store's stray or hostile file
                raise StoreError(f"cannot read {path}: {st.st_size} bytes, longer than any chunk")
            data = os.read(fd, st.st_size)
            while len(data) < st.st_size:  # short read (unusual for regular files)
                more = os.read(fd, st.st_size - len(data))
                if not more:
                    break
                data += more
            return data
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}", e.errno) from None
        finally:
            os.close(fd)

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        for converters in self._candidates():
            path = self._path(chunk_id, converters.extension)
            stored = self._read(path)
            if stored is None:
                continue
            return self.checked(chunk_id, stored, converters, path, digest)
        raise ChunkMissing(chunk_id, [self.location], self._other_format(chunk_id))

    def begin_place(self, chunk_id: ChunkId, digest: str | None,
                    placement: Placement) -> Callable[[], bytes | None]:
        return functools.partial(self._place, chunk_id, digest, placement)

    def _place(self, chunk_id: ChunkId, digest: str | None, placement: Placement) -> bytes | None:
        """The chunk file read, decoded, verified and written in one native call; anything that
        call does not handle (another format, a damaged file) goes through get() and its errors."""
        if not self.converters.encrypted:
            for converters in self._formats:
                done = place_file(self._path(chunk_id, converters.extension), MAX_ENCODED_CHUNK,
                                  converters.compressed, chunk_id, digest, not self.options.skip_verify,
                                  placement)
                if done:
                    return None
                if done is not None:  # there, but for the ordinary path
                    break
        return self.get(chunk_id, digest)

    def _other_format(self, chunk_id: ChunkId) -> str:
        """What the store holds under this id in a format it was not opened for (a chunk stored
        encrypted, read without the key): the hint a user needs. One small directory read, on a miss."""
        name = str(chunk_id)
        try:
            found = [e.name for e in os.scandir(os.path.join(self.path, name[:4]))
                     if e.name.startswith(name + ".")]
        except OSError:
            return ""
        for other in found:
            if any(alg in other for alg in ALGORITHMS):
                return (f"the store holds {other}, an encrypted chunk: give this store its encryption "
                        f"options (store-options in the config)")
        return f"the store holds {found[0]}, in another format" if found else ""

    def open_stored(self, chunk_id: ChunkId) -> tuple[int, int, Converters]:
        """(open fd, size, converters of its format) of the chunk file, for serving it without copying.

        The caller closes the fd. Raises ChunkMissing when absent.
        """
        for converters in self._candidates():
            path = self._path(chunk_id, converters.extension)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue
                raise StoreError(f"cannot read {path}: {e.strerror}", e.errno) from None
            return fd, os.fstat(fd).st_size, converters
        raise ChunkMissing(chunk_id, [self.location])

    def get_stored(self, chunk_id: ChunkId) -> tuple[bytes, Converters]:
        """The chunk file's bytes and the converters of their format (for servers)."""
        for converters in self._candidates():
            stored = self._read(self._path(chunk_id, converters.extension))
            if stored is not None:
                return stored, converters
        raise ChunkMissing(chunk_id, [self.location])

    def has(self, chunk_id: ChunkId) -> bool:
        for converters in self._candidates():
            try:
                st = os.lstat(self._path(chunk_id, converters.extension))
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                return True
        return False

    def stored_size(self, chunk_id: ChunkId) -> int | None:
        try:
            return os.stat(self.chunk_path(chunk_id), follow_symlinks=False).st_size
        except OSError:
            return None

    # ---- writes ----------------------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return os.access(self.path, os.W_OK)

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        """Install already-encoded chunk bytes under the store's own name, atomically.

        The bytes go to a temporary name in the prefix directory first; a reader
        sees the whole chunk or none. Concurrent writers of one chunk write
        identical bytes, so whichever rename lands last is as good as the first.
        """
        encoded = self.in_own_format(chunk_id, stored, fmt)
        final = self.chunk_path(chunk_id)
        folder = final[: final.rfind(os.sep)]
        temp = f"{folder}{os.sep}{TEMP_PREFIX}{_TEMP_TOKEN}-{next(_temp_counter)}"
        try:
            fd = self._open_temp(folder, temp)
            try:
                _write_all(fd, encoded)
            finally:
                os.close(fd)
            os.rename(temp, final)
        except BaseException as e:
            _unlink_quietly(temp)
            if isinstance(e, OSError):
                raise StoreError(f"cannot write chunk {chunk_id} to {self.path}: {e.strerror}") from None
            raise

    @staticmethod
    def _open_temp(folder: str, temp: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(temp, flags, 0o644)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
            return os.open(temp, flags, 0o644)

    def remove(self, chunk_id: ChunkId) -> None:
        for converters in self._candidates():
            _unlink_quietly(self._path(chunk_id, converters.extension))

    # ---- listing ---------------------------------------------------------------------------
    def ids(self) -> Iterator[ChunkId]:
        """Ids of the chunks stored in this store's own format."""
        for _path, chunk_id in self.files():
            yield chunk_id

    def files(self) -> Iterator[tuple[str, ChunkId]]:
        """(path, id) of each chunk file in the store's own format (exactly its extension)."""
        for prefix in sorted(_listdir(self.path)):
            folder = os.path.join(self.path, prefix)
            if len(prefix) != 4 or not os.path.isdir(folder):
                continue
            for name in sorted(_listdir(folder)):
                if name[64:] != self._suffix or not _CHUNK_ID.match(name):
                    continue
                if name[:4] == prefix:
                    yield os.path.join(folder, name), ChunkId(name[:64])

    def remove_temporaries(self) -> None:
        for temp in self.temp_files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def temp_files(self) -> Iterator[str]:
        """Leftover temporary files of interrupted writes."""
        for prefix in _listdir(self.path):
            folder = os.path.join(self.path, prefix)
            if os.path.isdir(folder):
                for name in _listdir(folder):
                    if name.startswith(TEMP_PREFIX) or name.endswith(".tmp"):
                        yield os.path.join(folder, name)


# Temporary names: unique per process (random token) and per write (counter), without a syscall.
_TEMP_TOKEN = secrets.token_hex(6)
_temp_counter = itertools.count()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
