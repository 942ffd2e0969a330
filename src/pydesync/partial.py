"""Interrupted extracts and how the next one takes them up.

A blob extract builds its output as `.NAME.partial` beside the target, with the index it is
being built for in `.NAME.partial.caibx`, and renames it into place when complete. Whatever
stops it (an error, Ctrl-C, SIGTERM, kill -9, a power cut) leaves the two files, and the next
extract to NAME starts from them: every chunk in the partial is hashed before it is kept (what a
crash left may be anything, a torn write included), and only what is missing or wrong is
fetched. A partial built for another index (an older version of the image) becomes
`.NAME.partial-old`, a seed checked chunk by chunk, never the output. A tree extract from a network
store keeps the chunks it fetched in `.NAME.partial-chunks/` for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator, Sequence

from .chunkio import chunk_ids
from .digest import ChunkId, null_chunk_id
from .errors import PydesyncError
from .fsutil import remove_stale_temps, temp_name_for, write_bytes_atomic
from .index import MAX_INDEX_BYTES, Index, IndexChunk, parse_index
from .parallel import for_each
from .seed import Seed, read_range
from .store.base import Store
from .store.options import StoreOptions

PARTIAL = ".partial"  # `.NAME.partial` (+ `.caibx`): an unfinished extract of NAME and its index
SALVAGE = ".partial-old"  # a partial built for another index, kept as a seed while a new one grows
PARTIAL_CHUNKS = ".partial-chunks"  # a tree extract's chunks so far (`.NAME.partial-chunks/`)
CHECK_RUN = 4 << 20  # bytes of consecutive chunks read and hashed in one step when checking a file


def partial_paths(output: str, kind: str = PARTIAL) -> tuple[str, str]:
    """(blob, index) of the partial output of `output` (or of its salvaged predecessor)."""
    folder, base = os.path.split(os.path.abspath(output))
    blob = os.path.join(folder, f".{base}{kind}")
    return blob, blob + ".caibx"


def discard_partial(output: str) -> None:
    """Remove what interrupted blob extracts of `output` left (--no-resume)."""
    for kind in (PARTIAL, SALVAGE):
        for path in partial_paths(output, kind):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def resumable_chunks(target: str, store: Store, resume: bool = True) -> Iterator[Store]:
    """`store` read through a local cache beside a tree extract's target (`.NAME.partial-chunks`,
    uncompressed, so keeping a chunk costs a write and no CPU): a run that stops leaves it, and the
    next run to the same target reads its chunks from there (each verified on read, as every store
    read is) instead of fetching them again. Removed once the extract succeeds, or with
    resume=False before it starts. Only for stores on a network."""
    from .fsutil import remove_tree
    from .store.local import LocalStore
    from .store.router import CachedStore

    folder = partial_paths(target, PARTIAL_CHUNKS)[0]
    if not resume and os.path.isdir(folder):
        remove_tree(folder)
    if not store.remote:  # (nothing is fetched from a local store: keeping copies would only cost)
        yield store
        return
    try:
        cache = LocalStore(folder, StoreOptions(uncompressed=True), create=True)
    except PydesyncError:  # (the target's parent is not writable: then without the cache)
        yield store
        return
    yield CachedStore(cache, store)
    remove_tree(folder)


def held_positions(fd: int, index: Index, positions: Sequence[int], workers: int) -> list[int]:
    """Those of `positions` (sorted) whose bytes in the open file `fd` hash to their chunk's id.

    Runs of consecutive chunks are read and hashed together, in threads (the native hash releases
    the GIL). A run that lies in a hole holds none of its chunks but the all-zero max-size ones
    (which an extract leaves as holes): nothing there is read. A chunk cut short by the end of
    the file is not held.
    """
    chunks = index.chunks
    zero_size = index.sizes.max
    zero_id = null_chunk_id(zero_size, index.digest)
    held: list[int] = []
    lock = threading.Lock()

    def check(run: tuple[int, int]) -> None:
        a, b = run
        start = chunks[a].start
        if _in_hole(fd, start, chunks[b - 1].end):
            found = [i for i in range(a, b) if chunks[i].size == zero_size and chunks[i].id == zero_id]
        else:
            data = read_range(fd, start, chunks[b - 1].end - start)
            whole = [i for i in range(a, b) if chunks[i].end - start <= len(data)]
            ids = chunk_ids(data, 0, [chunks[i].end - start for i in whole], index.digest, zero_size, zero_id)
            found = [i for i, got in zip(whole, ids, strict=True) if got == chunks[i].id]
        with lock:
            held.extend(found)

    for_each(check, list(_runs(chunks, positions)), workers)
    return sorted(held)


def _runs(chunks: Sequence[IndexChunk], positions: Sequence[int]) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of consecutive positions, each at most CHECK_RUN bytes (or one chunk)."""
    a = prev = -1
    for p in positions:
        if a >= 0 and (p != prev + 1 or chunks[p].end - chunks[a].start > CHECK_RUN):
            yield a, prev + 1
            a = -1
        if a < 0:
            a = p
        prev = p
    if a >= 0:
        yield a, prev + 1


def _in_hole(fd: int, start: int, end: int) -> bool:
    """Whether [start, end) of the file has no data (never written since a truncate). Where the
    filesystem cannot tell (or for a device), everything is data."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= end
    except OSError as e:
        return e.errno == errno.ENXIO  # (no data from `start` to the end of the file)


def chunks_in_partials(index: Index, output: str, workers: int) -> set[ChunkId]:
    """The distinct chunks of `index` that interrupted extracts of `output` left in their partials
    (`.NAME.partial`, `.NAME.partial-old`), each hashed: what an extract to `output` would take
    from them instead of fetching (`info --output`)."""
    wanted = {c.id for c in index}
    found: set[ChunkId] = set()
    for kind in (PARTIAL, SALVAGE):
        blob, index_path = partial_paths(output, kind)
        partial_index = _read_index(index_path)
        if partial_index is None or partial_index.digest != index.digest:
            continue
        try:
            fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            chunks = partial_index.chunks
            positions = [i for i, c in enumerate(chunks) if c.id in wanted and c.id not in found]
            found.update(chunks[i].id for i in held_positions(fd, partial_index, positions, workers))
        finally:
            os.close(fd)
    return found


class Target:
    """The file being assembled: the target's partial (`.NAME.partial`, kept with its index when
    the extract stops, and taken up again by the next one), a temporary file when another
    extract holds the partial, or the target itself in place."""

    def __init__(self, output: str, index: Index, in_place: bool, resume: bool = True):
        self.output = output
        self.block_device = False
        try:
            st = os.stat(output)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                raise PydesyncError(f"cannot write {output}: is a directory")
            mode = stat.S_IMODE(st.st_mode)
        except FileNotFoundError:
            mode = 0o644
        self.in_place = in_place or self.block_device
        self.partial = False  # whether self.path is the partial (kept on failure)
        self.resumed = False  # whether the partial holds an earlier run's chunks of this index
        self.salvage: Seed | None = None  # a partial of another index, to copy verified chunks from
        length = index.length
        try:
            if self.in_place:
                self.path = output
                self.fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
            else:
                self.fd = self._open_partial(index, mode, resume)
        except OSError as e:
            raise PydesyncError(f"cannot write {output}: {e.strerror}") from None
        try:  # from here on a failure (or Ctrl-C) must not leave a temporary file behind
            size = os.lseek(self.fd, 0, os.SEEK_END)
            #: Whether the file holds nothing of the blob yet (a new file: no chunk is looked for in it).
            self.blank = (not self.in_place and not self.resumed) or size == 0
            self.blocksize = os.fstat(self.fd).st_blksize or 4096
            if not self.block_device:
                os.ftruncate(self.fd, length)
            elif size < length:
                raise PydesyncError(f"device {output} ({size} bytes) is smaller than the blob "
                                    f"({length} bytes)")
        except BaseException:
            self.abort()
            raise

    def _open_partial(self, index: Index, mode: int, resume: bool) -> int:
        """Open (and lock) the target's partial, taking up an earlier run's if it was for this
        index; one for another index becomes the salvage seed. Another extract of the same
        target holding the partial: a temporary file of our own (not resumable)."""
        if not resume:
            discard_partial(self.output)
        blob, index_path = partial_paths(self.output)
        remove_stale_temps(*os.path.split(os.path.abspath(self.output)))
        fd = os.open(blob, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.path = temp_name_for(self.output)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        self.path, self.partial = blob, True
        wanted = index.to_bytes()
        previous = _read_small(index_path, MAX_INDEX_BYTES)
        held = os.fstat(fd).st_size > 0
        if held and previous == wanted:
            self.resumed = True
        elif held and previous is not None:
            fd = self._salvage(fd, blob, index_path, mode)
        else:
            os.ftruncate(fd, 0)  # (without its index, what it holds cannot be told apart)
        if not self.resumed:
            write_bytes_atomic(index_path, wanted)  # (before any chunk of the partial)
        old_blob, old_index = partial_paths(self.output, SALVAGE)
        if os.path.exists(old_blob):
            self.salvage = _salvage_seed(old_blob, old_index)
        return fd

    def _salvage(self, fd: int, blob: str, index_path: str, mode: int) -> int:
        """The partial of another index becomes `.NAME.partial-old` (replacing an older one); a new,
        empty partial is opened in its place."""
        old_blob, old_index = partial_paths(self.output, SALVAGE)
        os.replace(index_path, old_index)
        os.replace(blob, old_blob)
        os.close(fd)
        fd = os.open(blob, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        return fd

    def write(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise self.write_error(e) from None

    def write_error(self, e: OSError) -> PydesyncError:
        """A write into the output that failed, named after the output (not its temporary name)."""
        return PydesyncError(f"cannot write {self.output}: {e.strerror}")

    def commit(self) -> None:
        fd, self.fd = self.fd, -1
        os.close(fd)
        if not self.in_place:
            os.replace(self.path, self.output)
        if self.partial:
            discard_partial(self.output)

    def abort(self) -> None:
        """Close; a temporary file goes, the partial stays (with its index) for the next run
        unless nothing was written into it (a sparse file with no blocks)."""
        keep = self.partial
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                keep = keep and (self.resumed or os.fstat(self.fd).st_blocks > 0)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.partial and not keep:
            discard_partial(self.output)
        elif not self.in_place and not self.partial:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _read_small(path: str, limit: int) -> bytes | None:
    """The file's bytes (None if absent, unreadable or longer than `limit`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return None
    return data if len(data) < limit else None


def _read_index(path: str) -> Index | None:
    """A partial's index (None when it is gone, too big or does not parse)."""
    data = _read_small(path, MAX_INDEX_BYTES)
    try:
        return parse_index(data) if data is not None else None
    except PydesyncError:
        return None


def _salvage_seed(blob: str, index_path: str) -> Seed | None:
    """The salvaged partial as a seed whose chunks are each checked, a bad one simply fetched
    (None when its index is gone or does not parse: then both files go)."""
    seed_index = _read_index(index_path)
    if seed_index is None:
        for path in (blob, index_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return None
    return Seed(index_path, blob, seed_index, salvage=True)
