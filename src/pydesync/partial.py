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
from .index import Index, IndexChunk, parse_index
from .parallel import for_each
from .seed import Seed, read_range
from .store.base import Store
from .store.options import StoreOptions

PARTIAL = ".partial"  # `.NAME.partial` (+ `.caibx`): an unfinished extract of NAME and its index
SALVAGE = ".partial-old"  # a partial built for another index, kept as a seed while a new one grows
PARTIAL_CHUNKS = ".partial-chunks"  # a tree extract's chunks so far (`.NAME.partial-chunks/`)
CHECK_RUN = 4 << 20  # bytes of consecutive chunks read and hashed in one step when checking a file


def is_partial_index(name: str) -> bool:
    """Whether a file name is that of a partial's index (`.NAME.partial.caibx`, `-old` too)."""
    return name.startswith(".") and name.endswith((PARTIAL + ".caibx", SALVAGE + ".caibx"))


def partial_paths(output: str, kind: str = PARTIAL) -> tuple[str, str]:
    """(blob, index) of the partial output of `output` (or of its salvaged predecessor)."""
    folder, base = os.path.split(os.path.abspath(output))
    blob = os.path.join(folder, f".{base}{kind}")
    return blob, blob + ".caibx"


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
    the GIL). A run that lies in a hole (never written: most of what an interrupted extract
    lacks) is not read: it holds exactly its all-zero chunks, and the chunker cuts those only at
    the maximum size, at the minimum size (where its hash of a zero window is a boundary) or at
    the end, so only chunks of those sizes are compared with the id of zeros. A chunk cut short
    by the end of the file is not held.
    """
    chunks = index.chunks
    zero_size = index.sizes.max
    zero_id = null_chunk_id(zero_size, index.digest)
    zero_sizes = {index.sizes.min, index.sizes.max, chunks[-1].size} if chunks else set()
    held: list[int] = []
    lock = threading.Lock()

    def zeros(chunk: IndexChunk) -> bool:
        return chunk.size in zero_sizes and chunk.id == null_chunk_id(chunk.size, index.digest)

    def check(run: tuple[int, int]) -> None:
        a, b = run
        start = chunks[a].start
        if _in_hole(fd, start, chunks[b - 1].end):
            found = [i for i in range(a, b) if zeros(chunks[i])]
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
        partial_index = _read_index(index_path, max(SALVAGE_INDEX_LIMIT, 2 * len(index.to_bytes())))
        if partial_index is None or partial_index.digest != index.digest:
            continue
        try:
            fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            chunks = partial_index.chunks
            positions = [i for i, c in enumerate(chunks) if c.id in wanted and c.id not in found]
            found.update(chunks[i].id for i in held_positions(fd, partial_index, positions, workers))
        finally:
            os.close(fd)
    return found


class Target:
    """The file being assembled: the target's partial (`.NAME.partial`, kept with its index when
    the extract stops, and taken up again by the next one), a temporary file when another
    extract holds the partial, or the target itself in place (then a partial left by an
    earlier extract to it serves as a seed, and goes once the target is complete).

    The partial is locked (flock) while an extract uses it, and renamed into place before the
    lock goes, so no other extract ever takes up a file that has become the output."""

    def __init__(self, output: str, index: Index, in_place: bool, resume: bool = True):
        self.output = output
        if not os.path.basename(output) or os.path.basename(os.path.abspath(output)) in ("", ".", ".."):
            raise PydesyncError(f"cannot write '{output}': not a file name")
        self.block_device = False
        try:
            st = os.stat(output)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                raise PydesyncError(f"cannot write {output}: is a directory")
            self.mode = stat.S_IMODE(st.st_mode)
        except FileNotFoundError:
            self.mode = 0o644
        self.in_place = in_place or self.block_device
        self.partial = False  # whether self.path is the partial (kept on failure)
        self.resumed = False  # whether the partial holds an earlier run's chunks of this index
        self.salvage: list[Seed] = []  # partials of other indexes: verified chunks are copied from them
        self._lock = -1  # in place: the lock on a partial an earlier extract left, taken as a seed
        self.fd = -1
        length = index.length
        try:
            if self.in_place:
                self.path = output
                self.fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
                self._seed_from_partials(resume)
            else:
                self.fd = self._open_partial(index, resume)
        except OSError as e:
            self.abort()
            raise PydesyncError(f"cannot write {output}: {e.strerror}") from None
        except BaseException:
            self.abort()
            raise
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

    # ---- the partial ---------------------------------------------------------------------------
    def _open_partial(self, index: Index, resume: bool) -> int:
        """Open (and lock) the target's partial, taking up an earlier run's if it was for this
        index (the partial, or the one it displaced); one for another index becomes the salvage
        seed. Another extract of the same target holding the partial: a temporary file of our
        own (not resumable)."""
        blob, index_path = partial_paths(self.output)
        remove_stale_temps(*os.path.split(os.path.abspath(self.output)))
        if not resume and os.path.lexists(blob) and not _is_regular(blob):
            _unlink_files(blob)  # (a symlink or FIFO where the partial goes: a directory stays, and is said)
        fd = _lock_partial(blob, self.mode)
        if fd < 0:
            return self._own_temp()
        self.path, self.partial = blob, True
        old_blob, old_index = partial_paths(self.output, SALVAGE)
        if not resume:
            os.ftruncate(fd, 0)
            _unlink_files(old_blob, old_index)
        wanted = index.to_bytes()
        held = os.fstat(fd).st_size > 0
        previous = _read_regular(index_path, max(len(wanted), SALVAGE_INDEX_LIMIT)) if held else None
        if previous == wanted:
            self.resumed = True
        elif _read_regular(old_index, len(wanted)) == wanted and _is_regular(old_blob):
            fd = self._swap_with_salvage(fd, held and previous is not None)  # (the run before this one)
        elif held and previous is not None:
            _move_files((blob, index_path), (old_blob, old_index))  # (our lock stays on the file moved)
            os.close(fd)
            fd = _lock_partial(blob, self.mode)
            if fd < 0:  # (another extract took the new name meanwhile)
                return self._own_temp()
        else:
            os.ftruncate(fd, 0)  # (without its index, what it holds cannot be told apart)
        if not self.resumed:
            os.ftruncate(fd, 0)
            write_bytes_atomic(index_path, wanted)  # (before any chunk of the partial)
        seed = _salvage_seed(old_blob, old_index, max(len(wanted), SALVAGE_INDEX_LIMIT))
        self.salvage = [seed] if seed is not None else []
        return fd

    def _own_temp(self) -> int:
        """Another extract holds the partial: a temporary file of our own, not resumable."""
        self.partial = False
        self.path = temp_name_for(self.output)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode | 0o600)

    def _swap_with_salvage(self, fd: int, keep_current: bool) -> int:
        """`.NAME.partial-old` was built for this very index (an extract of another index came in
        between): it becomes the partial again, and the current one (if it holds anything) the
        salvage seed."""
        blob, index_path = partial_paths(self.output)
        old_blob, old_index = partial_paths(self.output, SALVAGE)
        swap = partial_paths(self.output, ".partial-swap")
        if keep_current:
            _move_files((blob, index_path), swap)
        _move_files((old_blob, old_index), (blob, index_path))
        if keep_current:
            _move_files(swap, (old_blob, old_index))
        os.close(fd)
        fd = _lock_partial(blob, self.mode)
        if fd < 0:
            return self._own_temp()
        self.resumed = True
        return fd

    def _seed_from_partials(self, resume: bool) -> None:
        """In place: what an earlier extract to this target left (a partial of any index, and
        what it displaced) is a seed, each chunk checked; it goes once the target is complete,
        or now with resume=False. A partial another extract holds is left alone."""
        blob, index_path = partial_paths(self.output)
        old_blob, old_index = partial_paths(self.output, SALVAGE)
        present = [path for path in (blob, old_blob) if _is_regular(path)]
        if not present:
            return
        try:
            self._lock = _lock_partial(present[0], self.mode)
        except PydesyncError:
            return
        if self._lock < 0:
            return
        if not resume:
            _unlink_files(blob, index_path, old_blob, old_index)
            return
        self.salvage = [seed for seed in (_salvage_seed(blob, index_path, SALVAGE_INDEX_LIMIT),
                                          _salvage_seed(old_blob, old_index, SALVAGE_INDEX_LIMIT))
                        if seed is not None]

    # ---- writing -------------------------------------------------------------------------------
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

    # ---- the end -------------------------------------------------------------------------------
    def commit(self) -> None:
        """The complete file takes the output's name. The partial's index and the salvaged partial
        go first, and the rename happens while the lock is held: another extract starting now
        finds no partial, or a new one of its own, never this file."""
        if self.partial or self._lock >= 0:
            blob, index_path = partial_paths(self.output)
            _unlink_files(index_path, *partial_paths(self.output, SALVAGE))
            if self._lock >= 0:  # (in place: what earlier extracts left has served)
                _unlink_files(blob)
        if not self.in_place:
            if self.mode & 0o600 != 0o600:  # (written as the owner's; the output's own mode now)
                os.fchmod(self.fd, self.mode)
            os.replace(self.path, self.output)
        self._close()

    def abort(self) -> None:
        """Close; a temporary file goes, the partial stays (with its index) for the next run
        unless nothing was written into it (a sparse file with no blocks)."""
        if self.partial and self.fd >= 0 and not self.resumed:
            with contextlib.suppress(OSError):
                if os.fstat(self.fd).st_blocks == 0:
                    _unlink_files(*partial_paths(self.output))
        elif not self.in_place and not self.partial and self.fd >= 0:
            _unlink_files(self.path)
        self._close()

    def _close(self) -> None:
        for seed in self.salvage:
            seed.close()
        for fd in (self.fd, self._lock):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._lock = -1


SALVAGE_INDEX_LIMIT = 16 << 20  # bytes of a partial's index read to salvage it (~1M chunks)
REMEDY = "remove it, or run with --no-resume"


def _lock_partial(blob: str, mode: int) -> int:
    """The partial `blob` opened (created if absent) and locked; -1 if another extract holds it.
    A file renamed or replaced between the open and the lock is opened again; anything but a
    regular file there is an error that names it."""
    while True:
        try:
            fd = os.open(blob, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                         mode | 0o600)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ETXTBSY):
                raise  # (the folder's fault, not the partial's: said of the output)
            raise PydesyncError(f"cannot use {blob}: {e.strerror} ({REMEDY})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PydesyncError(f"cannot use {blob}: not a regular file ({REMEDY})")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return -1
            try:
                now = os.stat(blob, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # (renamed into place by the extract that held it: look again)


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_regular(path: str, limit: int) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes (None if absent, something else, or
    bigger: a FIFO does not block, a huge file is not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def _unlink_files(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(path)


def _move_files(sources: tuple[str, str], targets: tuple[str, str]) -> None:
    """(blob, index) to their new names, the index first (a blob without its index is never
    taken up)."""
    for source, target in zip(sources[::-1], targets[::-1], strict=True):
        try:
            os.replace(source, target)
        except FileNotFoundError:
            _unlink_files(target)


def _read_index(path: str, limit: int) -> Index | None:
    """A partial's index (None when it is gone, not a regular file, too big or does not parse)."""
    data = _read_regular(path, limit)
    try:
        return parse_index(data) if data is not None else None
    except PydesyncError:
        return None


def _salvage_seed(blob: str, index_path: str, limit: int) -> Seed | None:
    """A partial of another index as a seed whose chunks are each checked, a bad one simply
    fetched (None when there is none; when its index is gone, too big or does not parse, both
    files go)."""
    if not _is_regular(blob):
        if os.path.lexists(blob) or os.path.lexists(index_path):
            _unlink_files(blob, index_path)
        return None
    seed_index = _read_index(index_path, limit)
    if seed_index is None:
        _unlink_files(blob, index_path)
        return None
    return Seed(index_path, blob, seed_index, salvage=True)
