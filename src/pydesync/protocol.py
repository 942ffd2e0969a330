"""casync's remote protocol (casync's caprotocol.h and caremote.c): the `pull` server and a client session.

Every message is {u64 size, u64 type, body}, 16 bytes to 16 MiB. Both sides send
HELLO with their feature flags at once. A pull client then sends REQUESTs (one
HIGH_PRIORITY id for what it needs now, big low-priority lists to prefetch;
the same id may come again) and the server answers each id once with CHUNK
(compressed .cacnk bytes, flag COMPRESSED) or MISSING. A casync client hangs up
without GOODBYE; EOF and a broken pipe are a normal end.

Neither casync nor desync time out a silent peer. Our client does, after the store's
`timeout` (1 min by default) without a byte while an answer is owed, so a remote that
stalls ends the command with an error instead of hanging it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import queue
import select
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from .codec import CodecError, compress, decompress
from .digest import ChunkId, digest_from_flags
from .errors import ChunkInvalid, ChunkMissing, PydesyncError
from .fsutil import atomic_write
from .index import MAX_INDEX_BYTES, IndexChunk, stream_index
from .parallel import ordered_map
from .store.base import Store, verify_chunk
from .store.converters import COMPRESSED

HELLO = 0x3C71D0948CA5FBEE
INDEX = 0xB32A91DD2B3E27F8
INDEX_EOF = 0x4F0932F1043718F5
ARCHIVE = 0x95D6428A69EDDCC5
ARCHIVE_EOF = 0x450BEF663F24CBAD
REQUEST = 0x8AB427E0F89D9210
CHUNK = 0x5213DD180A84BC8C
MISSING = 0xD010F9FAC82B7B6C
GOODBYE = 0xAD205DBF1A3686C3
ABORT = 0xE7D9136B7EFEA352
NAMES = {HELLO: "HELLO", INDEX: "INDEX", INDEX_EOF: "INDEX_EOF", ARCHIVE: "ARCHIVE",
         ARCHIVE_EOF: "ARCHIVE_EOF", REQUEST: "REQUEST", CHUNK: "CHUNK", MISSING: "MISSING",
         GOODBYE: "GOODBYE", ABORT: "ABORT"}

READABLE_STORE, WRITABLE_STORE, READABLE_INDEX, WRITABLE_INDEX = 0x1, 0x2, 0x4, 0x8
READABLE_ARCHIVE, WRITABLE_ARCHIVE = 0x10, 0x20
PULL_CHUNKS, PULL_INDEX, PULL_ARCHIVE = 0x40, 0x80, 0x100
PUSH_CHUNKS, PUSH_INDEX, PUSH_INDEX_CHUNKS, PUSH_ARCHIVE = 0x200, 0x400, 0x800, 0x1000
FLAGS_MAX = 0x1FFF
# Each operation a side wants, and the service the other side must offer for it.
NEEDS = {PULL_CHUNKS: READABLE_STORE, PULL_INDEX: READABLE_INDEX, PULL_ARCHIVE: READABLE_ARCHIVE,
         PUSH_CHUNKS: WRITABLE_STORE, PUSH_INDEX: WRITABLE_INDEX, PUSH_ARCHIVE: WRITABLE_ARCHIVE}

REQUEST_HIGH_PRIORITY = 0x1
CHUNK_COMPRESSED = 0x1
MAX_MESSAGE = 16 * 1024 * 1024
PIECE = 64 * 1024  # index/archive bytes per message, as casync sends them
STREAM_BATCH = 1024  # ids per REQUEST when prefetching
STUCK_SENDER_WAIT = 5.0  # seconds a finished push server waits for its REQUEST sender
REQUEST_WINDOW = 16384  # index chunks a push server asks about at once (memory flat whatever the index)


class ProtocolError(PydesyncError):
    """The peer broke the protocol, or aborted."""


def encode(kind: int, body: bytes = b"") -> bytes:
    return struct.pack("<QQ", 16 + len(body), kind) + body


class PeerQuiet(ProtocolError):
    """Nothing arrived within the channel's timeout, between messages."""


class Channel:
    """Messages over a pair of byte streams (pipes of ssh or of our own stdin/stdout).

    With `timeout` (seconds; the reader and writer must be unbuffered pipes), a read that waits
    longer raises PeerQuiet between messages and ProtocolError inside one (a late body is a cut
    message, not an idle peer), and a peer that takes no byte we send for that long is a
    ProtocolError (it stopped reading: waiting on it would hang the command)."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, peer: str = "peer", timeout: float | None = None):
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.timeout = timeout if timeout is not None and math.isfinite(timeout) and timeout > 0 else None
        self._send_lock = threading.Lock()

    def _wait(self, inside: bool) -> None:
        if self.timeout is None:
            return
        ready, _, _ = select.select([self.reader], [], [], self.timeout)
        if not ready:
            if inside:
                raise ProtocolError(f"{self.peer}: stalled for {self.timeout:g} s in the middle of a message")
            raise PeerQuiet(f"{self.peer}: no answer for {self.timeout:g} s")

    def _read_exact(self, n: int, inside: bool = False) -> bytes | None:
        self._wait(inside)
        data = self.reader.read(n)
        if not data:
            return None
        while len(data) < n:
            self._wait(inside=True)
            more = self.reader.read(n - len(data))
            if not more:
                raise ProtocolError(f"{self.peer}: connection closed in the middle of a message")
            data += more
        return data

    def receive(self) -> tuple[int, bytes] | None:
        """(type, body) of the next message, or None when the peer closed the stream."""
        head = self._read_exact(16)
        if head is None:
            return None
        size, kind = struct.unpack("<QQ", head)
        if not 16 <= size <= MAX_MESSAGE:
            raise ProtocolError(f"{self.peer}: message of {size} bytes")
        body = self._read_exact(size - 16, inside=True) if size > 16 else b""
        if body is None:
            raise ProtocolError(f"{self.peer}: connection closed in the middle of a message")
        if kind == ABORT:
            errno_, = struct.unpack_from("<Q", body) if len(body) >= 8 else (0,)
            reason = body[8:].rstrip(b"\0").decode("utf-8", "replace")
            raise ProtocolError(f"{self.peer} aborted: {reason or f'error {errno_}'}")
        return kind, body

    def messages(self) -> Iterator[tuple[int, bytes]]:
        """Messages until the peer closes the stream."""
        while (message := self.receive()) is not None:
            yield message

    def send(self, kind: int, body: bytes = b"") -> None:
        with self._send_lock:
            try:
                if self.timeout is None:
                    view = memoryview(encode(kind, body))
                    while view:  # (a raw pipe may take part of it)
                        view = view[self.writer.write(view) or 0:]
                    self.writer.flush()
                else:
                    self._write_bounded(encode(kind, body))
            except ValueError:  # our end was closed (the connection was given up meanwhile)
                raise ProtocolError(f"{self.peer}: connection closed") from None

    def _write_bounded(self, data: bytes) -> None:
        """Write all of `data`, failing if the peer takes nothing for `timeout` seconds."""
        fd = self.writer.fileno()
        if os.get_blocking(fd):
            os.set_blocking(fd, False)  # (our end of the pipe only)
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [fd], [], self.timeout)
            if not ready:
                raise ProtocolError(f"{self.peer}: stopped reading what we send for {self.timeout:g} s")
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue

    def send_abort(self, errno_: int, reason: str) -> None:
        """Tell the peer why we stop, unless another send is stuck on a peer that reads nothing."""
        text = "".join(c if " " <= c <= "~" else "?" for c in reason)[:4000]
        if not self._send_lock.acquire(timeout=STUCK_SENDER_WAIT):
            return
        self._send_lock.release()
        self.send(ABORT, struct.pack("<Q", errno_) + text.encode() + b"\0")


def check_hello(mine: int, theirs: int, peer: str) -> None:
    """Both sides' flags valid, and every operation either side wants offered by the other."""
    for flags, who in ((mine, "our"), (theirs, f"{peer}'s")):
        if flags == 0 or flags & ~FLAGS_MAX:
            raise ProtocolError(f"invalid {who} HELLO flags {flags:#x}")
        if flags & PUSH_INDEX_CHUNKS and not (flags & PUSH_INDEX and flags & PUSH_CHUNKS):
            raise ProtocolError(f"invalid {who} HELLO flags {flags:#x}")
    for want, service in NEEDS.items():
        if mine & want and not theirs & service:
            raise ProtocolError(f"{peer} does not offer what we need (HELLO {theirs:#x})")
        if theirs & want and not mine & service:
            raise ProtocolError(f"{peer} wants a service we do not offer (HELLO {theirs:#x})")


def read_hello(channel: Channel) -> int:
    message = channel.receive()
    if message is None:
        raise ProtocolError(f"{channel.peer} closed the connection before HELLO")
    kind, body = message
    if kind != HELLO or len(body) != 8:
        raise ProtocolError(f"{channel.peer}: expected HELLO, got {NAMES.get(kind, hex(kind))}")
    return struct.unpack("<Q", body)[0]


# ---- server (`pull`) -------------------------------------------------------------------------------
class PullServer:
    """Serve a store (and optionally an index or archive file) to one pull client.

    A reader thread queues requested ids (high priority first, each id once);
    the main loop answers them, so a chunk the client waits for overtakes a
    long prefetch list.
    """

    def __init__(self, channel: Channel, store: Store | None, index: str | None = None,
                 archive: str | None = None):
        self.channel = channel
        self.store = store
        self.index = index
        self.archive = archive
        self._queue: list[tuple[int, int, bytes]] = []
        self._seq = 0
        self._queued: set[bytes] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None

    def offer(self) -> int:
        return ((READABLE_STORE if self.store is not None else 0) | (READABLE_INDEX if self.index else 0)
                | (READABLE_ARCHIVE if self.archive else 0))

    def serve(self) -> None:
        self.channel.send(HELLO, struct.pack("<Q", self.offer()))
        wanted = read_hello(self.channel)
        check_hello(self.offer(), wanted, "client")
        if wanted & PULL_INDEX and self.index:
            self._send_file(self.index, INDEX, INDEX_EOF)
        if wanted & PULL_ARCHIVE and self.archive:
            self._send_file(self.archive, ARCHIVE, ARCHIVE_EOF)
        reader = threading.Thread(target=self._read_requests, daemon=True)
        reader.start()
        while True:
            chunk_id = self._next()
            if chunk_id is None:
                break
            self._answer(ChunkId(chunk_id))
        if self._error is not None:
            raise self._error

    def _send_file(self, path: str, kind: int, eof: int) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; only opening gets its own message
        except OSError as e:
            raise PydesyncError(f"cannot read {path}: {e.strerror}") from None
        with f:
            while piece := f.read(PIECE):
                self.channel.send(kind, piece)
        self.channel.send(eof)

    def _read_requests(self) -> None:
        try:
            for kind, body in self.channel.messages():
                if kind == GOODBYE:
                    break
                if kind != REQUEST or len(body) < 40 or (len(body) - 8) % 32:
                    raise ProtocolError(f"client sent an unexpected {NAMES.get(kind, hex(kind))} message")
                flags, = struct.unpack_from("<Q", body)
                if flags & ~REQUEST_HIGH_PRIORITY:
                    raise ProtocolError(f"invalid REQUEST flags {flags:#x}")
                priority = 0 if flags & REQUEST_HIGH_PRIORITY else 1
                with self._cond:
                    for off in range(8, len(body), 32):
                        cid = body[off:off + 32]
                        if cid not in self._queued:
                            self._queued.add(cid)
                            heapq.heappush(self._queue, (priority, self._seq, cid))
                            self._seq += 1
                    self._cond.notify()
        except BaseException as e:
            self._error = e
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify()

    def _next(self) -> bytes | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._queue:
                return heapq.heappop(self._queue)[2]
            return None

    def _answer(self, chunk_id: ChunkId) -> None:
        try:
            data, compressed = self._stored(chunk_id)
        except ChunkMissing:
            self.channel.send(MISSING, bytes(chunk_id))
            return
        self.channel.send(CHUNK, struct.pack("<Q", CHUNK_COMPRESSED if compressed else 0) + chunk_id + data)

    def _stored(self, chunk_id: ChunkId) -> tuple[bytes, bool]:
        """The chunk as sent: the stored .cacnk bytes, or zstd of a raw chunk (clients expect zstd)."""
        store = self.store
        assert store is not None  # (asked for chunks only when it serves a store)
        data, converters = store.get_stored(chunk_id)
        if converters.encrypted:
            data = store.get(chunk_id)  # decrypts and verifies
        elif converters.compressed:
            return data, True
        return compress(data), True


# ---- server (`push`) -------------------------------------------------------------------------------
class PushServer:
    """Receive what one client pushes: casync's `make` with a remote index (its chunks requested as
    the index lists them) or a remote archive, or our own client's chunks.

    Nothing is trusted: the index must parse, the archive must decode, every chunk must hash to
    its id (with the index's digest) before it is stored. The index and the archive are written
    under temporary names and renamed into place only once every chunk they need is stored;
    then the server says GOODBYE. A client that hangs up early leaves no index and no archive
    (the chunks it sent stay: they are valid, and prune removes what nothing references).

    Memory stays flat whatever the index: it goes to its temporary file as it comes, and is
    then read back a window of REQUEST_WINDOW chunks at a time, each checked; the next window's
    missing chunks are asked for once the last window's have all come.
    """

    def __init__(self, channel: Channel, store: Store | None, lookup: list[Store] | None = None,
                 index: str | None = None, archive: str | None = None, workers: int = 2):
        self.channel = channel
        self.store = store
        self.lookup = lookup if lookup is not None else ([store] if store is not None else [])
        self.index_path = index
        self.archive_path = archive
        self.workers = max(1, workers)
        self._wants = 0
        self._index_file: BinaryIO | None = None
        self._index_size = 0
        self._index_items: Iterator[IndexChunk] | None = None  # what is left to ask for
        self._archive_file: BinaryIO | None = None
        self._digest: str | None = None
        self._outstanding: set[bytes] = set()
        self._requests: queue.Queue[list[bytes] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._files: contextlib.ExitStack | None = None  # what the session holds open
        self._index_done = self._archive_done = self._client_done = False

    def offer(self) -> int:
        return ((WRITABLE_STORE if self.store is not None else 0) | (WRITABLE_INDEX if self.index_path else 0)
                | (WRITABLE_ARCHIVE if self.archive_path else 0))

    def serve(self) -> None:
        self.channel.send(HELLO, struct.pack("<Q", self.offer()))
        self._wants = read_hello(self.channel)
        check_hello(self.offer(), self._wants, "client")
        if not self._wants & (PUSH_CHUNKS | PUSH_INDEX | PUSH_ARCHIVE):
            raise ProtocolError("the client pushes nothing")
        with contextlib.ExitStack() as files:
            if self._wants & PUSH_INDEX:
                assert self.index_path is not None
                self._index_file = _enter_output(files, self.index_path)
            if self._wants & PUSH_ARCHIVE:
                assert self.archive_path is not None
                self._archive_file = _enter_output(files, self.archive_path)
            sender = threading.Thread(target=self._send_requests, daemon=True)
            sender.start()
            files.callback(self._stop_requests, sender)
            self._files = files
            for _ in ordered_map(self._store_chunk, self._incoming_chunks(), self.workers):
                pass
            if self._index_file is not None and self.store is not None \
                    and not self._wants & PUSH_INDEX_CHUNKS:
                self._check_index_covered(files)
            if self._archive_file is not None:
                self._check_archive(self._archive_file)
        self.channel.send(GOODBYE)  # (the index and the archive are in place: the client may go)

    # ---- messages ----------------------------------------------------------------------------
    def _incoming_chunks(self) -> Iterator[tuple[ChunkId, bytes, bool]]:
        """The CHUNKs to verify and store, handling every other message on the way, until the
        push is complete."""
        if self._complete():
            return
        for kind, body in self.channel.messages():
            if kind == CHUNK:
                if self._wants & PUSH_INDEX and not self._index_done:
                    raise ProtocolError("client sent a chunk before its index")
                yield self._chunk_message(body)
            elif kind == MISSING and len(body) == 32:
                raise ProtocolError(f"the client lacks chunk {body.hex()}, which its index lists")
            elif kind == INDEX and self._index_file is not None and not self._index_done and body:
                self._index_piece(body)
            elif kind == INDEX_EOF and self._index_file is not None and not self._index_done:
                self._index_end()
            elif kind == ARCHIVE and self._archive_file is not None and not self._archive_done and body:
                self._archive_file.write(body)
            elif kind == ARCHIVE_EOF and self._archive_file is not None and not self._archive_done:
                self._archive_done = True
            elif kind == GOODBYE:
                self._client_done = True
            else:
                raise ProtocolError(f"client sent an unexpected {NAMES.get(kind, hex(kind))} message")
            if self._complete():
                return
        raise ProtocolError("the client hung up before the push was complete")

    def _complete(self) -> bool:
        if self._wants & PUSH_INDEX and not self._index_done:
            return False
        if self._wants & PUSH_ARCHIVE and not self._archive_done:
            return False
        if self._outstanding or self._index_items is not None:
            return False
        if self._wants & PUSH_CHUNKS and not self._wants & PUSH_INDEX_CHUNKS:
            return self._client_done  # chunks come unasked: the client says when it is done
        return True

    def _index_piece(self, body: bytes) -> None:
        assert self._index_file is not None
        self._index_size += len(body)
        if self._index_size > MAX_INDEX_BYTES:
            raise ProtocolError(f"the client's index is larger than {MAX_INDEX_BYTES} bytes")
        self._index_file.write(body)

    def _index_end(self) -> None:
        """The whole index is in its file: check its head and tail now, its chunks as they are
        asked for (or all now, if the client pushes none)."""
        assert self._index_file is not None and self._files is not None
        self._index_done = True
        reader = self._files.enter_context(files_reader(self._index_file))
        flags, _, items = stream_index(reader, self._index_size, "pushed index")
        self._digest = digest_from_flags(flags)
        if not self._wants & PUSH_INDEX_CHUNKS:
            for _ in items:  # checked in full before it takes its name
                pass
            return
        self._index_items = items
        self._ask_next_window()

    def _ask_next_window(self) -> None:
        """Ask for the missing chunks of the next window of the index (the windows after it, for
        as long as one lacks nothing)."""
        while self._index_items is not None and not self._outstanding:
            window = list(itertools.islice(self._index_items, REQUEST_WINDOW))
            if len(window) < REQUEST_WINDOW:
                self._index_items = None  # (the last window: the index was checked to its end)
            wanted = list(dict.fromkeys(bytes(c.id) for c in window if not self._have(c.id)))
            self._outstanding = set(wanted)
            if wanted:
                self._requests.put(wanted)

    def _check_index_covered(self, files: contextlib.ExitStack) -> None:
        """A client that pushes an index but answers no REQUESTs: the index is installed only if
        the stores here hold every chunk it names."""
        assert self._index_file is not None
        reader = files.enter_context(files_reader(self._index_file))
        _, _, items = stream_index(reader, self._index_size, "pushed index")
        missing = sum(1 for chunk in items if not self._have(chunk.id))
        if missing:
            raise ProtocolError(f"the pushed index names {missing} chunks that no store here has, and the "
                                f"client does not send the chunks of its index")

    def _have(self, chunk_id: ChunkId) -> bool:
        return any(store.has(chunk_id) for store in self.lookup)

    def _send_requests(self) -> None:
        """Send the REQUESTs (a thread: the client's CHUNKs are read meanwhile, so neither side
        blocks on a full pipe). A failure here shows as the client's end."""
        with contextlib.suppress(OSError, ValueError):
            while (ids := self._requests.get()) is not None:
                for i in range(0, len(ids), STREAM_BATCH):
                    if self._stopping.is_set():
                        return
                    self.channel.send(REQUEST, struct.pack("<Q", 0) + b"".join(ids[i:i + STREAM_BATCH]))

    def _stop_requests(self, sender: threading.Thread) -> None:
        """End the sender before anything else is sent (GOODBYE, or the caller's ABORT). A sender
        stuck on a client that reads nothing is left behind (nothing more can reach that client)."""
        self._stopping.set()
        self._requests.put(None)
        sender.join(STUCK_SENDER_WAIT)

    def _chunk_message(self, body: bytes) -> tuple[ChunkId, bytes, bool]:
        if len(body) < 41:
            raise ProtocolError("client sent a malformed CHUNK message")
        flags, = struct.unpack_from("<Q", body)
        if flags & ~CHUNK_COMPRESSED:
            raise ProtocolError(f"invalid CHUNK flags {flags:#x}")
        key = body[8:40]
        if self._wants & PUSH_INDEX_CHUNKS:
            if key not in self._outstanding:
                raise ProtocolError(f"client sent chunk {key.hex()}, which was not asked for")
            self._outstanding.discard(key)
            if not self._outstanding:
                self._ask_next_window()
        return ChunkId(key), body[40:], bool(flags & CHUNK_COMPRESSED)

    # ---- storing -----------------------------------------------------------------------------
    def _store_chunk(self, item: tuple[ChunkId, bytes, bool]) -> None:
        """Verify one chunk and store it (a worker thread): compressed bytes go in as they came
        when the store keeps them compressed, as casync's push does."""
        chunk_id, wire, compressed = item
        try:
            data = decode_payload(wire, compressed)
        except CodecError as e:
            raise ChunkInvalid(chunk_id, f"invalid chunk {chunk_id} from the client: {e}", "client") from None
        verify_chunk(chunk_id, data, self._digest, "client")
        store = self.store
        assert store is not None  # (chunks are requested only for a store)
        own = store.converters
        if compressed and own is not None and own.compressed and not own.encrypted:
            store.put_stored(chunk_id, wire, COMPRESSED)  # as it came
        else:
            store.put(chunk_id, data)

    def _check_archive(self, f: BinaryIO) -> None:
        """Decode the received archive in full before it takes its name."""
        from .catar.decoder import ArchiveDecoder

        with files_reader(f) as reader:
            for _ in ArchiveDecoder(reader, "pushed archive"):
                pass


def files_reader(f: BinaryIO) -> BinaryIO:
    """A second, independent reader of a file being written (its data flushed first)."""
    f.flush()
    return open(f"/proc/self/fd/{f.fileno()}", "rb")


def _enter_output(files: contextlib.ExitStack, path: str) -> BinaryIO:
    """A file written under a temporary name beside `path`, renamed over it when `files` closes
    without an error."""
    try:
        return files.enter_context(atomic_write(path))
    except OSError as e:
        raise PydesyncError(f"cannot write {path}: {e.strerror}") from None


# ---- client session -----------------------------------------------------------------------------
class _Waiter:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: tuple[bytes, bool] | None = None
        self.error: BaseException | None = None


class AlreadyAsked(ProtocolError):
    """The session was asked for this id before: a pull server (casync's or ours) answers each id
    once per session, so asking again would wait forever. Ask another session."""

    def __init__(self, key: bytes):
        super().__init__(f"chunk {key.hex()} already asked in this session")
        self.key = key


class PullSession:
    """One pull conversation shared by many threads: each sends its REQUEST and waits for
    its answer, which a reader thread hands over as it arrives (many requests in flight)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.channel.send(HELLO, struct.pack("<Q", PULL_CHUNKS))
        theirs = read_hello(channel)
        if not theirs & READABLE_STORE:
            raise ProtocolError(f"{channel.peer}: server not offering chunks (HELLO {theirs:#x})")
        check_hello(PULL_CHUNKS, theirs, channel.peer)
        self._waiting: dict[bytes, list[_Waiter]] = {}
        self._streams: dict[bytes, queue.Queue[tuple[bytes, tuple[bytes, bool] | BaseException | None]]] = {}
        self._asked: set[bytes] = set()  # a pull server answers each id once per session
        self._lock = threading.Lock()
        self.broken: BaseException | None = None
        threading.Thread(target=self._read_answers, daemon=True).start()

    def stream(self, ids: list[bytes], window: int = 64) -> Iterator[tuple[bytes, tuple[bytes, bool] | None]]:
        """Request all ids at once (casync's prefetch); the (id, answer) pairs as answers arrive.
        AlreadyAsked at once if this session was asked for one of them before.

        At most `window` answers wait unconsumed; beyond that the reader stops
        reading and the server blocks on its pipe (backpressure, flat memory).
        """
        answers: queue.Queue[tuple[bytes, tuple[bytes, bool] | BaseException | None]] = queue.Queue(window)
        unique = list(dict.fromkeys(ids))
        with self._lock:
            if self.broken is not None:
                raise self._failure(self.broken)
            again = next((key for key in unique if key in self._asked), None)
            if again is not None:
                raise AlreadyAsked(again)
            self._asked.update(unique)
            for key in unique:
                self._streams[key] = answers

        def send_requests() -> None:
            try:
                for i in range(0, len(unique), STREAM_BATCH):
                    batch = unique[i:i + STREAM_BATCH]
                    self.channel.send(REQUEST, struct.pack("<Q", 0) + b"".join(batch))
            except (OSError, ValueError) as e:  # ValueError: the session was closed meanwhile
                answers.put((b"", e if isinstance(e, OSError) else OSError(str(e))))

        threading.Thread(target=send_requests, daemon=True).start()
        return self._arrivals(answers, len(unique))

    def _arrivals(self, answers: queue.Queue[tuple[bytes, tuple[bytes, bool] | BaseException | None]],
                  count: int) -> Iterator[tuple[bytes, tuple[bytes, bool] | None]]:
        for _ in range(count):
            key, answer = answers.get()
            if isinstance(answer, BaseException):
                raise self._failure(answer)
            yield key, answer

    def fetch(self, chunk_id: ChunkId) -> tuple[bytes, bool] | None:
        """(data, compressed) of the chunk, or None if the server says MISSING."""
        waiter = _Waiter()
        key = bytes(chunk_id)
        with self._lock:
            if self.broken is not None:
                raise self._failure(self.broken)
            first = key not in self._waiting
            if first and key in self._asked:  # answered already: it would never be again
                raise AlreadyAsked(key)
            self._asked.add(key)
            self._waiting.setdefault(key, []).append(waiter)
        if first:
            self.channel.send(REQUEST, struct.pack("<Q", REQUEST_HIGH_PRIORITY) + key)
        waiter.event.wait()
        if waiter.error is not None:
            raise self._failure(waiter.error)
        return waiter.result

    def asked(self, key: bytes) -> bool:
        """Whether this session was asked for `key` (and will not answer it again)."""
        with self._lock:
            return key in self._asked

    def _failure(self, error: BaseException) -> ProtocolError:
        """What a caller sees when the session broke: the reader's own error (it names the peer)."""
        return error if isinstance(error, ProtocolError) else ProtocolError(f"{self.channel.peer}: {error}")

    def _outstanding(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._streams)

    def busy(self) -> bool:
        """Whether answers are still owed (a session to keep)."""
        return self._outstanding()

    def _answers(self) -> Iterator[tuple[int, bytes]]:
        """The server's messages; quiet spells are fine while no answer is owed."""
        while True:
            try:
                message = self.channel.receive()
            except PeerQuiet:
                if self._outstanding():
                    raise
                continue
            if message is None:
                return
            yield message

    def _read_answers(self) -> None:
        error: BaseException = ProtocolError(f"{self.channel.peer}: connection closed")
        try:
            for kind, body in self._answers():
                if kind == CHUNK and len(body) >= 41:
                    flags, = struct.unpack_from("<Q", body)
                    self._resolve(body[8:40], (body[40:], bool(flags & CHUNK_COMPRESSED)))
                elif kind == MISSING and len(body) == 32:
                    self._resolve(body, None)
                else:
                    raise ProtocolError(f"{self.channel.peer}: unexpected {NAMES.get(kind, hex(kind))}")
        except BaseException as e:
            error = e
        with self._lock:
            self.broken = error
            waiting, self._waiting = self._waiting, {}
            streams, self._streams = self._streams, {}
        for q in {id(q): q for q in streams.values()}.values():
            q.put((b"", error))
        for waiters in waiting.values():
            for w in waiters:
                w.error = error
                w.event.set()

    def _resolve(self, key: bytes, result: tuple[bytes, bool] | None) -> None:
        with self._lock:
            waiters = self._waiting.pop(key, [])
            stream = self._streams.pop(key, None)
        if stream is not None:
            stream.put((key, result))
        for w in waiters:
            w.result = result
            w.event.set()

    def goodbye(self) -> None:
        self.channel.send(GOODBYE)


class PushClient:
    """Our side of a push, as casync's make does it: HELLO with what we push, then an index whose
    chunks the remote asks for (those it lacks), or chunks unasked followed by GOODBYE. The remote's
    GOODBYE says everything is stored and in place."""

    def __init__(self, channel: Channel, wants: int):
        self.channel = channel
        channel.send(HELLO, struct.pack("<Q", wants))
        self.offered = read_hello(channel)
        check_hello(wants, self.offered, channel.peer)

    def push_index(self, data: bytes, chunk_for: Callable[[bytes], tuple[bytes, bool] | None]) -> int:
        """Send the index, then answer the remote's REQUESTs with `chunk_for(id)` ((bytes,
        compressed), or None: MISSING) until its GOODBYE; returns how many chunks were sent."""
        for i in range(0, len(data), PIECE):
            self.channel.send(INDEX, data[i:i + PIECE])
        self.channel.send(INDEX_EOF)
        sent = 0
        for kind, body in self.channel.messages():
            if kind == GOODBYE:
                return sent
            if kind != REQUEST or len(body) < 40 or (len(body) - 8) % 32:
                raise ProtocolError(f"{self.channel.peer}: unexpected {NAMES.get(kind, hex(kind))}")
            for off in range(8, len(body), 32):
                key = body[off:off + 32]
                answer = chunk_for(key)
                if answer is None:
                    self.channel.send(MISSING, key)
                    continue
                self._send_chunk(key, *answer)
                sent += 1
        raise ProtocolError(f"{self.channel.peer} closed the connection before the push was complete")

    def push_index_alone(self, data: bytes) -> bool:
        """Send an index (no chunks) and GOODBYE, which makes casync's remote install it and exit
        (it says nothing more; ours answers GOODBYE). True if the remote said GOODBYE; False if it
        just ended (the caller checks how the remote command exited)."""
        for i in range(0, len(data), PIECE):
            self.channel.send(INDEX, data[i:i + PIECE])
        self.channel.send(INDEX_EOF)
        with contextlib.suppress(OSError, ValueError):
            self.channel.send(GOODBYE)
        for kind, _ in self.channel.messages():
            if kind == GOODBYE:
                return True
            raise ProtocolError(f"{self.channel.peer}: unexpected {NAMES.get(kind, hex(kind))}")
        return False

    def push_chunks(self, chunks: Iterable[tuple[bytes, bytes, bool]]) -> None:
        """Send (id, bytes, compressed) unasked, then GOODBYE, and wait for the remote's. A remote
        that ends first (casync's, which takes chunks only with an index) is an error."""
        ended: list[BaseException | None] = []
        said_goodbye = threading.Event()
        watcher = threading.Thread(target=self._watch_end, args=(said_goodbye, ended), daemon=True)
        watcher.start()
        try:
            for key, stored, compressed in chunks:
                if ended:
                    break
                self._send_chunk(key, stored, compressed)
            if not ended:
                said_goodbye.set()
                self.channel.send(GOODBYE)
        except (OSError, ValueError, ProtocolError) as e:
            # a remote that stopped taking what we send may have said why: its words first
            watcher.join(self.channel.timeout or STUCK_SENDER_WAIT)
            if ended and ended[0] is not None:
                raise ended[0] from None
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError(f"{self.channel.peer}: {e}") from None
        watcher.join()
        if ended[0] is not None:
            raise ended[0]

    def _watch_end(self, said_goodbye: threading.Event, ended: list[BaseException | None]) -> None:
        """Wait for the remote's one message, its GOODBYE (a thread: the remote says nothing while
        chunks come, however long that takes)."""
        error: BaseException | None
        peer = self.channel.peer
        try:
            while True:
                try:
                    message = self.channel.receive()
                    break
                except PeerQuiet:
                    if said_goodbye.is_set():
                        raise
            if message is None:
                error = ProtocolError(f"{peer} closed the connection before the push was complete")
            elif message[0] != GOODBYE:
                error = ProtocolError(f"{peer}: unexpected {NAMES.get(message[0], hex(message[0]))}")
            elif not said_goodbye.is_set():
                error = ProtocolError(f"{peer} ended the push before taking the chunks (casync's remote "
                                      f"takes chunks only with an index: give the index as an ssh:// "
                                      f"location on the same host too)")
            else:
                error = None
        except BaseException as e:
            error = e
        ended.append(error)

    def _send_chunk(self, key: bytes, stored: bytes, compressed: bool) -> None:
        self.channel.send(CHUNK, struct.pack("<Q", CHUNK_COMPRESSED if compressed else 0) + key + stored)


def read_index_stream(channel: Channel) -> bytes:
    """Pull just the index a remote serves (`pull - - INDEX -`): its bytes, at most MAX_INDEX_BYTES."""
    channel.send(HELLO, struct.pack("<Q", PULL_INDEX))
    check_hello(PULL_INDEX, read_hello(channel), channel.peer)
    data = bytearray()
    for kind, body in channel.messages():
        if kind == INDEX_EOF:
            return bytes(data)
        if kind != INDEX:
            raise ProtocolError(f"{channel.peer}: unexpected {NAMES.get(kind, hex(kind))}")
        if len(data) + len(body) > MAX_INDEX_BYTES:
            raise ProtocolError(f"{channel.peer}: index larger than {MAX_INDEX_BYTES} bytes")
        data += body
    if not data:
        raise ProtocolError(f"{channel.peer} closed the connection without sending the index")
    raise ProtocolError(f"{channel.peer} closed the connection in the middle of the index")


def decode_payload(data: bytes, compressed: bool) -> bytes:
    """A CHUNK body's data as chunk bytes (compressed with any codec casync knows)."""
    if not compressed:
        return data
    return decompress(data)
