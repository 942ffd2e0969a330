"""mount-index: a blob index as one read-only file, an archive index (or archive) as a tree.

Users mount an image to read a few files without downloading it all, so nothing is
fetched up front: a read fetches the chunks it touches (through the store chain and
cache), keeps the most recent ones decompressed in a small shared cache, and answers
EIO for a range whose chunk cannot be had (other ranges still read). Many readers may
read at once (FUSE runs callbacks on several threads).

An archive (`.caidx` through the stores, or a `.catar` file) is scanned once at mount
time to build its directory tree; file payloads are skipped by seeking, so only the
chunks holding entries' metadata are fetched then. Owners, modes, times, symlinks and
xattrs are shown as recorded.

Copy-on-read (`cor_file`, desync's sparse-file mode): loaded chunks are also written
to a sparse file and remembered in a bitmap (one bit per index entry, LSB first), which
can be saved on exit and loaded on the next mount so it starts warm.

The FUSE binding is mfusepy over libfuse3 (the `mount` extra); see `mount()`.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import signal
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .blobreader import fetch_chunk
from .catar.decoder import ArchiveDecoder, DirectoryEnd, Node
from .digest import digest_of, null_chunk_id
from .errors import PydesyncError, UsageError
from .fsutil import write_bytes_atomic
from .index import Index, IndexChunk
from .parallel import for_each
from .seed import Seed
from .store.base import Store

CACHE_CHUNKS = 64  # decompressed chunks kept for readers (a few MiB)
READ_AHEAD = 8  # chunks fetched ahead of a reader, in the background


def load_fuse() -> Any:
    try:
        import mfusepy
    except ImportError:
        raise UsageError("mount-index needs mfusepy: pip install 'pydesync[mount]'") from None
    except OSError as e:  # mfusepy loads libfuse when imported
        raise UsageError(f"mount-index needs FUSE (libfuse3, e.g. apt-get install fuse3): {e}") from None
    return mfusepy


class ChunkReader:
    """Random access to a blob through its index and a store, safe for concurrent readers."""

    def __init__(self, index: Index, store: Store, cor_file: str | None = None,
                 on_error: Callable[[str], None] | None = None, seeds: Sequence[Seed] = ()):
        self.index = index
        self.store = store
        self.seeds = list(seeds)  # opened; a chunk found in one is read from it (and checked)
        self.on_error = on_error
        self._ends = [c.end for c in index]
        self._null = null_chunk_id(index.sizes.max, index.digest)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Event] = {}
        self._ahead = ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="read-ahead")
        self._last = -1
        self.cor_fd = -1
        self.cor_reset = True
        self.loaded = bytearray((len(index) + 7) // 8)
        if cor_file is not None:
            self._open_cor(cor_file)

    # ---- copy-on-read file ----------------------------------------------------------------------
    def _open_cor(self, path: str) -> None:
        self.cor_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.cor_reset = os.fstat(self.cor_fd).st_size != self.index.length
        if self.cor_reset:  # not this index's: start empty (a saved state no longer applies)
            os.ftruncate(self.cor_fd, 0)
            os.ftruncate(self.cor_fd, self.index.length)

    def load_state(self, path: str) -> None:
        """Take a saved bitmap (chunks already in the cor file); refuses one of another index."""
        with open(path, "rb") as f:
            state = f.read()
        if len(state) != len(self.loaded):
            raise UsageError(f"sparse state file {path} does not match the index")
        if not self.cor_reset:
            self.loaded[:] = state

    def save_state(self, path: str) -> None:
        write_bytes_atomic(path, bytes(self.loaded))

    def _is_loaded(self, i: int) -> bool:
        return bool(self.loaded[i >> 3] & (1 << (i & 7)))

    # ---- reading ----------------------------------------------------------------------------------
    def chunk(self, i: int) -> bytes:
        """Chunk i's bytes: from the cache, the cor file, or the store (one fetch per chunk at a time)."""
        c = self.index.chunks[i]
        if c.id == self._null and c.size == self.index.sizes.max:
            return bytes(c.size)  # (not cached: nothing to fetch)
        while True:
            with self._lock:
                data = self._cache.get(i)
                if data is not None:
                    self._cache.move_to_end(i)
                    return data
                waiting = self._loading.get(i)
                if waiting is None:
                    self._loading[i] = threading.Event()
                    break
            waiting.wait()  # another reader is fetching it
        try:
            if self.cor_fd >= 0 and self._is_loaded(i):
                data = os.pread(self.cor_fd, c.size, c.start)
            else:
                data = self._from_seed(c) or fetch_chunk(self.index, self.store, c)
                if self.cor_fd >= 0:
                    os.pwrite(self.cor_fd, data, c.start)
                    with self._lock:
                        self.loaded[i >> 3] |= 1 << (i & 7)
            with self._lock:
                self._cache[i] = data
                while len(self._cache) > CACHE_CHUNKS:
                    self._cache.popitem(last=False)
            return data
        finally:
            with self._lock:
                self._loading.pop(i).set()

    def _from_seed(self, c: IndexChunk) -> bytes | None:
        """The chunk from a seed blob that holds it and whose bytes hash to its id, else None."""
        for seed in self.seeds:
            for q in seed.positions.get(c.id, ())[:4]:
                where = seed.index.chunks[q]
                data = os.pread(seed.fd, where.size, where.start)
                if len(data) == c.size and digest_of(data, self.index.digest) == c.id:
                    return data
        return None

    def read(self, offset: int, size: int) -> bytes:
        end = min(self.index.length, offset + size)
        if offset >= end:
            return b""
        first = bisect.bisect_right(self._ends, offset)
        out = []
        last = first
        for i in range(first, len(self.index)):
            c = self.index.chunks[i]
            if c.start >= end:
                break
            data = self.chunk(i)
            out.append(data[max(offset, c.start) - c.start:min(end, c.end) - c.start])
            last = i
        self._read_ahead(first, last)
        return b"".join(out)

    def _read_ahead(self, first: int, last: int) -> None:
        """A reader moving forward gets the next chunks fetched (decompressed, checked) meanwhile."""
        near = first - READ_AHEAD <= self._last <= last + READ_AHEAD  # (kernel threads reorder a bit)
        self._last = max(last, self._last) if near else last
        if not near:
            return  # random access: no read-ahead
        for i in range(last + 1, min(len(self.index), last + 1 + READ_AHEAD)):
            with self._lock:
                busy = i in self._cache or i in self._loading
            if not busy:
                self._ahead.submit(self._quietly, i)

    def _quietly(self, i: int) -> None:
        with contextlib.suppress(PydesyncError, OSError):
            self.chunk(i)

    def prefetch(self, state_path: str, workers: int) -> None:
        """Load the chunks a state file lists, in the background (errors are ignored)."""
        with open(state_path, "rb") as f:
            wanted = f.read()
        if len(wanted) != len(self.loaded):
            raise UsageError(f"sparse state file {state_path} does not match the index")
        todo = [i for i in range(len(self.index)) if wanted[i >> 3] & (1 << (i & 7))]

        def load(i: int) -> None:
            with contextlib.suppress(PydesyncError, OSError):
                self.chunk(i)
        threading.Thread(target=for_each, args=(load, todo, workers), daemon=True, name="prefetch").start()

    def close(self) -> None:
        self._ahead.shutdown(wait=True, cancel_futures=True)
        if self.cor_fd >= 0:
            os.close(self.cor_fd)
            self.cor_fd = -1


@dataclass
class Entry:
    """One node of a mounted tree: its metadata and, for files, where its bytes are."""

    node: Node
    offset: int = 0  # of the payload in the archive stream
    children: dict[str, Entry] = field(default_factory=dict)


class SeekableStream:
    """A read-only stream over a ChunkReader (or a file), whose seek fetches nothing: the tree
    scan skips file payloads this way."""

    def __init__(self, read_at: Callable[[int, int], bytes], length: int):
        self.read_at = read_at
        self.length = length
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.length - self.pos
        data = self.read_at(self.pos, min(n, 1 << 20))
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.length + offset
        return self.pos


def scan_tree(stream: SeekableStream, name: str) -> Entry:
    """The directory tree of an archive, with each file's payload offset."""
    decoder = ArchiveDecoder(stream, name)
    root: Entry | None = None
    stack: list[Entry] = []
    for item in decoder:
        if isinstance(item, DirectoryEnd):
            stack.pop()
            continue
        entry = Entry(item, decoder.offset if item.is_file else 0)
        if root is None:
            root = entry
        else:
            stack[-1].children[os.fsdecode(item.name)] = entry
        if item.is_dir:
            stack.append(entry)
        elif item.is_file:
            decoder.skip_by_seeking()
    if root is None:
        raise PydesyncError(f"{name}: empty archive")
    return root


def _attrs(node: Node, size: int) -> dict[str, Any]:
    seconds = node.mtime / 1e9
    return {"st_mode": node.mode, "st_uid": node.uid, "st_gid": node.gid, "st_size": size,
            "st_nlink": 2 if node.is_dir else 1, "st_mtime": seconds, "st_ctime": seconds,
            "st_atime": seconds, "st_rdev": os.makedev(*node.rdev) if node.rdev else 0}


def make_operations(fuse: Any, *, blob: tuple[str, ChunkReader] | None = None,
                    tree: tuple[Entry, Callable[[int, int], bytes]] | None = None,
                    on_error: Callable[[str], None] | None = None) -> Any:
    """The FUSE operations for one blob file (`blob`: name, reader) or a tree (`tree`: root, read_at)."""

    class Operations(fuse.Operations):
        use_ns = True

        def __init__(self) -> None:
            self.mounted = time.time_ns()

        def init_with_config(self, conn: Any, config: Any) -> None:
            """Larger kernel read-ahead and reads (fewer round trips for a sequential reader)."""
            if conn is not None:
                conn.max_readahead = 4 << 20

        def _entry(self, path: str) -> Entry:
            assert tree is not None
            entry = tree[0]
            for part in path.strip("/").split("/"):
                if part:
                    child = entry.children.get(part)
                    if child is None:
                        raise fuse.FuseOSError(errno.ENOENT)
                    entry = child
            return entry

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if blob is not None:
                now = self.mounted
                if path == "/":
                    return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_mtime": now, "st_ctime": now,
                            "st_atime": now}
                if path.strip("/") != blob[0]:
                    raise fuse.FuseOSError(errno.ENOENT)
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": blob[1].index.length,
                        "st_mtime": now, "st_ctime": now, "st_atime": now}
            entry = self._entry(path)
            node = entry.node
            attrs = _attrs(node, len(node.target) if node.target is not None else node.size or 0)
            for key in ("st_mtime", "st_ctime", "st_atime"):
                attrs[key] = entry.node.mtime
            return attrs

        def readdir(self, path: str, fh: int) -> list[str]:
            if blob is not None:
                return [".", "..", blob[0]]
            entry = self._entry(path)
            if not entry.node.is_dir:
                raise fuse.FuseOSError(errno.ENOTDIR)
            return [".", "..", *entry.children]

        def readlink(self, path: str) -> str:
            entry = self._entry(path)
            if entry.node.target is None:
                raise fuse.FuseOSError(errno.EINVAL)
            return os.fsdecode(entry.node.target)

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            if blob is None:
                for key, value in self._entry(path).node.xattrs:
                    if os.fsdecode(key) == name:
                        return value
            raise fuse.FuseOSError(fuse.ENOATTR)

        def listxattr(self, path: str) -> list[str]:
            if blob is not None:
                return []
            return [os.fsdecode(k) for k, _ in self._entry(path).node.xattrs]

        def open(self, path: str, flags: int) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise fuse.FuseOSError(errno.EROFS)
            if blob is None and not self._entry(path).node.is_file:
                raise fuse.FuseOSError(errno.EISDIR)
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            try:
                if blob is not None:
                    return blob[1].read(offset, size)
                assert tree is not None
                entry = self._entry(path)
                length = entry.node.size or 0
                if offset >= length:
                    return b""
                return tree[1](entry.offset + offset, min(size, length - offset))
            except (PydesyncError, OSError) as e:
                if on_error is not None:
                    on_error(f"read of {path} at {offset}: {e}")
                raise fuse.FuseOSError(errno.EIO) from None

    return Operations()


def mount(operations: Any, fuse: Any, mountpoint: str, name: str) -> None:
    """Serve until unmounted (SIGINT and SIGTERM unmount: libfuse's own handlers). Call from the
    main thread."""
    # kernel_cache: the content never changes, so the page cache keeps what was read across opens
    # and a second read is served by the kernel (set in the config at init, it was not honoured).
    # libfuse installs its own SIGINT/SIGTERM/SIGHUP handlers (which end the loop and unmount) only
    # over default ones; Python's would merely set a flag the C loop never looks at.
    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        fuse.FUSE(operations, mountpoint, foreground=True, ro=True, nothreads=False, kernel_cache=True,
                  fsname=f"pydesync:{name}", default_permissions=True)
    except RuntimeError as e:
        raise PydesyncError(f"cannot mount on {mountpoint}: {e} (is /dev/fuse usable here?)") from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
