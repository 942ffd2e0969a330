"""SFTP chunk and index stores: `sftp://[user@]host[:port]/path`, laid out as on disk.

As desync does, each connection is the system ssh client running the sftp
subsystem (`ssh -s -- [user@]host sftp`, or `$CASYNC_SSH_PATH` instead of
`ssh`), with paramiko speaking the SFTP protocol over its stdin/stdout. So
everything the user's ssh does applies unchanged: ~/.ssh/config (Host
aliases, ProxyJump, ControlMaster, Match), the agent, certificates, security
keys and known_hosts checking. A port in the URL is passed as `-p PORT`.

Up to `options.concurrency` connections are pooled (the first is opened at
once, to check that the base path exists; the others when needed). Chunks are
`<path>/<4 hex>/<64 hex><extension>`; a write goes to `<name><random int>`
and is renamed into place (posix-rename@openssh.com), creating the prefix
directory when the first attempt finds it missing. Listing (prune, verify)
walks the tree with one connection.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit

from ..codec import MAX_ENCODED_CHUNK
from ..digest import ChunkId
from ..errors import ChunkMissing, StoreError, UsageError
from ..index import MAX_INDEX_BYTES
from .base import FormattedStore, close_at_exit
from .converters import Converters
from .options import StoreOptions
from .registry import StoreKind

_CHUNK_ID = re.compile(r"^[0-9a-f]{64}")
_PREFIX = re.compile(r"^[0-9a-f]{4}$")
T = TypeVar("T")


def _paramiko() -> Any:
    try:
        import paramiko
    except ImportError:
        raise StoreError("sftp:// stores need paramiko: pip install 'pydesync[ssh]'") from None
    return paramiko


class _Lost(EOFError):
    """The ssh process went away or stopped answering (paramiko turns EOFError into SSHException)."""


class _Pipe:
    """The socket-like object paramiko's SFTPClient talks through: an ssh process's stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float | None):
        assert proc.stdin is not None and proc.stdout is not None
        self._out = proc.stdin.fileno()
        self._in = proc.stdout.fileno()
        self._proc = proc
        self._timeout = timeout

    def send(self, data: bytes) -> int:
        try:
            return os.write(self._out, data)
        except OSError as e:
            raise _Lost(f"write failed: {e.strerror}") from None

    def recv(self, n: int) -> bytes:
        ready, _, _ = select.select([self._in], [], [], self._timeout)
        if not ready:
            raise _Lost(f"no answer within {self._timeout:g}s")
        try:
            return os.read(self._in, n)
        except OSError as e:
            raise _Lost(f"read failed: {e.strerror}") from None

    def get_name(self) -> str:  # paramiko's log lines name the channel
        return f"ssh[{self._proc.pid}]"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]  # ssh sees EOF and ends the session





def ssh_command(host: str, port: int | None, user: str | None) -> list[str]:
    """The argv desync runs for one sftp session (plus `-p PORT` when the URL names a port)."""
    destination = f"{user}@{host}" if user else host
    if not host or destination.startswith("-"):
        raise UsageError(f"invalid ssh destination '{destination}'")
    argv = [os.environ.get("CASYNC_SSH_PATH") or "ssh"]
    if port is not None:
        argv += ["-p", str(port)]
    return [*argv, "-s", "--", destination, "sftp"]


class SftpConnection:
    """One ssh process with an SFTP session on it. Errors become StoreError; a connection that
    lost its process (or its sync) is marked `broken` and must be closed."""

    def __init__(self, argv: list[str], label: str, timeout: float | None):
        paramiko = _paramiko()
        self.label = label
        self.broken = False
        self._closed = False
        self._sftp: Any = None
        self._errors: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._errors, bufsize=0)
        except OSError as e:
            self._errors.close()
            hint = " (install OpenSSH or set CASYNC_SSH_PATH)" if isinstance(e, FileNotFoundError) \
                and not os.environ.get("CASYNC_SSH_PATH") else ""
            raise StoreError(f"{label}: cannot run {argv[0]}: {e.strerror}{hint}") from None
        close_at_exit(self)
        try:
            self._sftp = paramiko.SFTPClient(_Pipe(self._proc, timeout))
        except (paramiko.SSHException, EOFError, OSError) as e:
            reason = self._ssh_error() or str(e)
            self.close()
            raise StoreError(f"{label}: ssh failed: {reason}") from None

    def _ssh_error(self) -> str:
        """The last line ssh wrote to stderr (after it exits, briefly waited for)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=2)
        try:
            self._errors.seek(0)
            text = self._errors.read()[-4096:].decode(errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def call(self, what: str, op: Callable[[Any], T]) -> T:
        """Run op(sftp client); FileNotFoundError passes through, everything else is a StoreError."""
        paramiko = _paramiko()
        if self._closed or self.broken:
            raise StoreError(f"{self.label}: connection closed")
        try:
            return op(self._sftp)
        except FileNotFoundError:
            raise
        except (paramiko.SSHException, EOFError) as e:
            self.broken = True
            reason = self._ssh_error() if self._proc.poll() is not None else ""
            raise StoreError(f"{self.label}: {what}: connection lost: {reason or e}") from None
        except OSError as e:
            raise StoreError(f"{self.label}: {what}: {e.strerror or e}") from None

    # ---- operations ----------------------------------------------------------------------
    def stat(self, path: str) -> Any:
        return self.call(f"stat {path}", lambda s: s.stat(path))

    def read(self, path: str, limit: int = MAX_ENCODED_CHUNK) -> bytes | None:
        """The file's bytes, or None if it does not exist; a file longer than `limit` is an error
        (its size is checked before anything is read)."""
        def read(sftp: Any) -> bytes:
            with sftp.open(path, "rb") as f:
                st = f.stat()
                if stat.S_ISDIR(st.st_mode or 0):
                    raise IsADirectoryError(0, "is a directory")
                size = st.st_size or 0
                if size > limit:
                    raise StoreError(f"{self.label}: {path}: file of {size} bytes, longer than {limit} bytes")
                f.prefetch(size)  # pipelined reads instead of one round trip per 32 KiB
                data: bytes = f.read(size)
                return data
        try:
            return self.call(f"read {path}", read)
        except FileNotFoundError:
            return None

    def write_atomic(self, path: str, data: bytes | memoryview) -> None:
        """Write to `<path><random int>`, then rename over `path` (creating its directory if needed)."""
        temp = f"{path}{secrets.randbelow(1 << 63)}"
        folder = path.rpartition("/")[0]

        def write(sftp: Any) -> None:
            try:
                f = sftp.open(temp, "wb")
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    sftp.mkdir(folder)
                f = sftp.open(temp, "wb")
            try:
                with f:
                    f.set_pipelined(True)
                    f.write(bytes(data))
                try:
                    sftp.posix_rename(temp, path)
                except OSError:
                    # Servers without posix-rename: plain rename, which fails if a concurrent writer
                    # already installed the (identical) chunk.
                    try:
                        sftp.rename(temp, path)
                    except OSError:
                        sftp.stat(path)
                        sftp.remove(temp)
            except OSError:  # the server refused something: remove the temporary file
                with contextlib.suppress(Exception):
                    sftp.remove(temp)
                raise  # (a lost connection leaves it to prune: nothing can be sent any more)

        self.call(f"write {path}", write)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.call(f"remove {path}", lambda s: s.remove(path))

    def listdir(self, path: str) -> list[Any]:
        try:
            return self.call(f"list {path}", lambda s: s.listdir_attr(path))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
        else:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]  # (opened with PIPE)
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for f in (self._proc.stdout, self._errors):
            with contextlib.suppress(OSError):
                f.close()  # type: ignore[union-attr]  # (opened with PIPE)


class SftpBase:
    """A base URL on an sftp server and a pool of connections to it."""

    def __init__(self, location: str, options: StoreOptions, create: bool = False):
        url = urlsplit(location)
        if url.scheme.lower() != "sftp":
            raise UsageError(f"not an sftp location: {location}")
        try:
            port = url.port
        except ValueError:
            raise UsageError(f"invalid port in {location}") from None
        self.location = location
        self.path = unquote(url.path or "")
        if not self.path.endswith("/"):
            self.path += "/"
        self._argv = ssh_command(url.hostname or "", port, unquote(url.username) if url.username else None)
        timeout = options.timeout
        self._timeout = timeout if timeout is not None and 0 < timeout < float("inf") else None
        self._size = max(1, options.concurrency)
        self._slots = threading.BoundedSemaphore(self._size)
        self._lock = threading.Lock()
        self._idle: list[SftpConnection] = []
        self._all: set[SftpConnection] = set()
        self._closed = False
        try:
            with self.connection() as conn:  # the base path must exist, or be made if asked
                self._check_base(conn, create)
        except BaseException:
            self.close()
            raise

    def _check_base(self, conn: SftpConnection, create: bool) -> None:
        """The base path exists as a directory; with `create`, a missing one is made if its parent
        exists (local stores' rule: a typo in a path creates nothing at the root)."""
        try:
            st = conn.stat(self.path)
        except FileNotFoundError:
            if not create:
                raise StoreError(f"store {self.location} does not exist (no such path {self.path})") from None
            self._create_base(conn)
            return
        if not stat.S_ISDIR(st.st_mode or 0):
            raise StoreError(f"store {self.location} is not a directory")

    def _create_base(self, conn: SftpConnection) -> None:
        folder = self.path.rstrip("/") or "/"
        parent = folder.rpartition("/")[0] or "/"
        try:
            conn.stat(parent)
        except FileNotFoundError:
            raise StoreError(f"cannot create store {self.location}: {parent} does not exist") from None
        try:
            conn.call(f"create {folder}", lambda s: s.mkdir(folder))
        except FileNotFoundError:
            raise StoreError(f"cannot create store {self.location}: {parent} does not exist") from None
        except StoreError:
            try:  # made meanwhile by another writer (fine), or a file is in the way
                st = conn.stat(folder)
            except FileNotFoundError:
                raise StoreError(f"cannot create store {self.location}: the server refused") from None
            if not stat.S_ISDIR(st.st_mode or 0):
                raise StoreError(f"store {self.location} is not a directory") from None

    def _connect(self) -> SftpConnection:
        return SftpConnection(self._argv, f"sftp store {self.location}", self._timeout)

    @contextlib.contextmanager
    def connection(self) -> Iterator[SftpConnection]:
        """A connection for one operation (opened if none is idle, up to `concurrency` at once)."""
        self._slots.acquire()
        try:
            with self._lock:
                if self._closed:
                    raise StoreError(f"store {self.location} is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
                with self._lock:
                    self._all.add(conn)
            try:
                yield conn
            finally:
                with self._lock:
                    keep = not (conn.broken or self._closed)
                    if keep:
                        self._idle.append(conn)
                    else:
                        self._all.discard(conn)
                if not keep:
                    conn.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._all)
            self._all.clear()
            self._idle.clear()
        for conn in conns:  # also ones in use: their process goes, their request fails
            conn.close()


class SftpStore(FormattedStore):
    """Chunks under a path on an sftp server: `<path>/<4 hex>/<64 hex><extension>`."""

    remote = True
    listable = True

    def __init__(self, location: str, options: StoreOptions | None = None, create: bool = False):
        super().__init__(location, options)
        self._base = SftpBase(location, self.options, create)
        self.path = self._base.path

    def chunk_path(self, chunk_id: ChunkId) -> str:
        name = chunk_id.hex()
        return f"{self.path}{name[:4]}/{name}{self._suffix}"

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        path = self.chunk_path(chunk_id)
        with self._base.connection() as conn:
            stored = conn.read(path)
        if stored is None:
            raise ChunkMissing(chunk_id, [self.location])
        return self.checked(chunk_id, stored, self.converters, path, digest)

    def has(self, chunk_id: ChunkId) -> bool:
        path = self.chunk_path(chunk_id)
        with self._base.connection() as conn:
            try:
                conn.stat(path)
            except FileNotFoundError:
                return False
            except StoreError:
                if conn.broken:  # a dead connection is an error, not an absent chunk
                    raise
                return False
        return True

    def stored_size(self, chunk_id: ChunkId) -> int | None:
        with self._base.connection() as conn:
            try:
                return int(conn.stat(self.chunk_path(chunk_id)).st_size)
            except (FileNotFoundError, StoreError):
                return None

    @property
    def writable(self) -> bool:
        return True

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        encoded = self.in_own_format(chunk_id, stored, fmt)
        with self._base.connection() as conn:
            conn.write_atomic(self.chunk_path(chunk_id), encoded)

    def get_stored(self, chunk_id: ChunkId) -> tuple[bytes, Converters]:
        """The chunk file's bytes as they are, and their format (for servers)."""
        with self._base.connection() as conn:
            stored = conn.read(self.chunk_path(chunk_id))
        if stored is None:
            raise ChunkMissing(chunk_id, [self.location])
        return stored, self.converters

    def remove(self, chunk_id: ChunkId) -> None:
        with self._base.connection() as conn:
            conn.remove(self.chunk_path(chunk_id))

    def remove_temporaries(self) -> None:
        """Remove the files interrupted writes left (`<name><random int>`)."""
        for path in list(self.temp_files()):
            with self._base.connection() as conn:
                conn.remove(path)

    # ---- listing (one connection, released before the caller sees anything) ---------------
    def _walk(self) -> list[tuple[str, str]]:
        """(prefix directory, file name) of every file in the 4-hex directories."""
        found: list[tuple[str, str]] = []
        with self._base.connection() as conn:
            for entry in sorted(conn.listdir(self.path), key=lambda e: e.filename):
                if not _PREFIX.match(entry.filename) or not stat.S_ISDIR(entry.st_mode or 0):
                    continue
                folder = self.path + entry.filename
                found += [(entry.filename, e.filename) for e in sorted(conn.listdir(folder),
                                                                       key=lambda e: e.filename)]
        return found

    def files(self) -> Iterator[tuple[str, ChunkId]]:
        """(path, id) of each chunk file in the store's own format (exactly its extension)."""
        for prefix, name in self._walk():
            if name[64:] == self._suffix and _CHUNK_ID.match(name) and name[:4] == prefix:
                yield f"{self.path}{prefix}/{name}", ChunkId(name[:64])

    def ids(self) -> Iterator[ChunkId]:
        for _path, chunk_id in self.files():
            yield chunk_id

    def temp_files(self) -> Iterator[str]:
        """Leftover `<name><random int>` files of interrupted writes."""
        for prefix, name in self._walk():
            rest = name[64:]
            if _CHUNK_ID.match(name) and rest.startswith(self._suffix) and rest[len(self._suffix):].isdigit():
                yield f"{self.path}{prefix}/{name}"

    def close(self) -> None:
        self._base.close()


# ---- index stores -------------------------------------------------------------------------
def _index_base(location: str, options: StoreOptions | None) -> tuple[SftpBase, str]:
    base, _, name = location.rpartition("/")
    if name in ("", ".", "..") or "\\" in name:
        raise UsageError(f"invalid index name in {location}")
    opts = (options or StoreOptions()).override(concurrency=1)
    return SftpBase(base + "/", opts), name


def read_index_bytes(location: str, options: StoreOptions | None = None) -> bytes | None:
    """The bytes of the index at an sftp location, or None if it does not exist."""
    base, name = _index_base(location, options)
    try:
        with base.connection() as conn:
            return conn.read(base.path + name, MAX_INDEX_BYTES)
    finally:
        base.close()


def write_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    """Store an index at an sftp location (temporary name, then rename)."""
    base, name = _index_base(location, options)
    try:
        with base.connection() as conn:
            conn.write_atomic(base.path + name, data)
    finally:
        base.close()


KIND = StoreKind("sftp", SftpStore, read_index_bytes, write_index_bytes)
