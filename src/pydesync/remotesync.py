"""The wishlist transfer of CAFS's remotesync: one round trip for a differential transfer.

Sender and receiver agree on a SyncInfo (the file's chunk keys and sizes, and a permutation).
The receiver answers with a wishlist, one bit per position of the *shuffled* chunk sequence
(1 = send it), and the sender streams just those chunks, each as a zigzag varint length and
the bytes. Wire-compatible with CAFS (its remotesync: the sync info, the wishlist and the chunk stream):

* SyncInfo: Go's JSON `{"Chunks":[{"Key":"<hex>","Size":n}],"Perm":[...]}`, or the legacy
  binary form (32-byte key + varint size, repeated; implies Perm [0]).
* Shuffle: a k-slot buffer; put(v) stores v at slot perm[i] and emits slot i. n items plus k-1
  flushing placeholders become n+k-1 positions.
* Wishlist: MSB first, a byte flushed as soon as it is full, the last one zero-padded.
* Data: for each requested position, varint(length) then the raw chunk.

The receiver trusts nothing: a chunk whose SHA-256 or size is not what the SyncInfo says,
a short stream, or data after the last requested chunk is an error; so is a wishlist bit on
a placeholder, or a wishlist longer than the positions, on the sender's side.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Generic, TypeVar
from urllib.parse import urlsplit

from . import _chunker
from .errors import PydesyncError
from .fsutil import atomic_write

MAX_CHUNK = 131072  # CAFS's largest chunk; also the limit on any length on the wire
PLACEHOLDER_KEY = hashlib.sha256(b"").digest()
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


class SyncError(PydesyncError):
    """The other side broke the protocol (or sent data that does not match)."""


@dataclass(frozen=True)
class ChunkInfo:
    key: bytes  # SHA-256 of the chunk (CAFS mode) or a chunk id (our mode)
    size: int


@dataclass
class SyncInfo:
    chunks: list[ChunkInfo]
    perm: list[int] = field(default_factory=lambda: [0])
    max_size: int = field(default=MAX_CHUNK, compare=False)  # CAFS's 128 KiB; an index's max in our mode

    def __post_init__(self) -> None:
        if not self.perm or sorted(self.perm) != list(range(len(self.perm))):
            raise SyncError("SyncInfo: Perm is not a permutation of 0..k-1")
        for c in self.chunks:
            if len(c.key) != 32 or not 0 <= c.size <= self.max_size:
                raise SyncError(f"SyncInfo: invalid chunk (key of {len(c.key)} bytes, size {c.size})")

    # ---- encodings ----------------------------------------------------------------------------
    def to_json(self) -> bytes:
        """Go's encoding/json form, as httpsync serves it."""
        chunks = ",".join(f'{{"Key":"{c.key.hex()}","Size":{c.size}}}' for c in self.chunks)
        return f'{{"Chunks":[{chunks}],"Perm":[{",".join(map(str, self.perm))}]}}'.encode()

    @classmethod
    def from_json(cls, data: bytes, max_size: int = MAX_CHUNK) -> SyncInfo:
        try:
            raw = json.loads(data)
            chunks = [ChunkInfo(_key(c["Key"]), _size(c["Size"], max_size)) for c in raw.get("Chunks") or []]
            perm = raw.get("Perm")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SyncError(f"malformed SyncInfo JSON: {e}") from None
        if not isinstance(perm, list) or any(not isinstance(p, int) or isinstance(p, bool) for p in perm):
            raise SyncError("malformed SyncInfo JSON: Perm must be a list of integers")
        return cls(chunks, perm, max_size)

    def to_binary(self) -> bytes:
        """The legacy form (no permutation: only for Perm [0])."""
        if self.perm != [0]:
            raise SyncError("the binary SyncInfo form cannot carry a permutation")
        return b"".join(c.key + varint(c.size) for c in self.chunks)

    @classmethod
    def from_binary(cls, data: bytes) -> SyncInfo:
        chunks, pos = [], 0
        while pos < len(data):
            if len(data) - pos < 33:
                raise SyncError("truncated binary SyncInfo")
            key = data[pos:pos + 32]
            size, pos = read_varint_at(data, pos + 32)
            chunks.append(ChunkInfo(key, _size(size)))
        return cls(chunks)

    @property
    def positions(self) -> int:
        """Wishlist bits: n chunks plus k-1 flushing placeholders."""
        return len(self.chunks) + len(self.perm) - 1


def _key(text: object) -> bytes:
    if not isinstance(text, str) or not _HEX_KEY.match(text):
        raise SyncError(f"SyncInfo: invalid chunk key {text!r}")
    return bytes.fromhex(text)


def _size(n: object, limit: int = MAX_CHUNK) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
        raise SyncError(f"SyncInfo: chunk size {n!r} outside 0..{limit}")
    return n


# ---- CAFS's chunker -------------------------------------------------------------------------------
def cafs_chunks(reader: BinaryIO, block: int = 1 << 20) -> Iterator[bytes]:
    """The chunks CAFS's Adler-32 chunker cuts a stream into (48-byte window; a cut before the byte
    that makes the chunk longer than 128 bytes with checksum mod 8191 == 4159, or longer than
    128 KiB; each chunk from a fresh state). The scan is `_chunker.cafs_cuts`, in C."""
    buf = b""
    seen = False
    while True:
        more = reader.read(block)
        buf += more
        start = 0
        for cut in _chunker.cafs_cuts(buf, 0):
            yield buf[start:cut]
            start = cut
        buf = buf[start:]  # undecided: rescanned with more data (chunks start fresh, so no state)
        if not more:
            if buf or not seen:  # an empty stream is one empty chunk, as CAFS lists it
                yield buf
            return
        seen = True


def file_syncinfo(reader: BinaryIO, perm: list[int] | None = None) -> tuple[SyncInfo, list[int]]:
    """The SyncInfo of a file in CAFS mode (SHA-256 keys of its CAFS chunks), and the chunk offsets."""
    chunks, offsets, offset = [], [], 0
    for data in cafs_chunks(reader):
        chunks.append(ChunkInfo(hashlib.sha256(data).digest(), len(data)))
        offsets.append(offset)
        offset += len(data)
    return SyncInfo(chunks, perm or [0]), offsets


# ---- varints (Go's binary.PutVarint: zigzag, then LEB128) -----------------------------------------
def varint(n: int) -> bytes:
    u = (n << 1) ^ (n >> 63) if n < 0 else n << 1
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def _unzigzag(u: int) -> int:
    return (u >> 1) ^ -(u & 1)


def read_varint_at(data: bytes, pos: int) -> tuple[int, int]:
    u = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise SyncError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        u |= (b & 0x7F) << shift
        if not b & 0x80:
            return _unzigzag(u), pos
        shift += 7


def read_varint(stream: BinaryIO) -> int | None:
    """The next varint from a stream; None at a clean end of stream."""
    u = shift = 0
    while True:
        b = stream.read(1)
        if not b:
            if shift:
                raise SyncError("unexpected end of stream inside a length")
            return None
        if shift > 63:
            raise SyncError("overlong varint")
        u |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return _unzigzag(u)
        shift += 7


# ---- shuffling ------------------------------------------------------------------------------------
class Shuffler(Generic[T]):
    """k slots and a cursor: put(v) stores v at slot perm[i], returns what was in slot i."""

    def __init__(self, perm: list[int]):
        self.perm = perm
        self.slots: list[T | None] = [None] * len(perm)
        self.i = 0

    def put(self, value: T | None) -> T | None:
        k = len(self.perm)
        self.slots[self.perm[self.i]] = value
        out = self.slots[self.i]
        self.slots[self.i] = None
        self.i = (self.i + 1) % k
        return out


def shuffle(items: Iterable[T], perm: list[int]) -> Iterator[T | None]:
    """items through a shuffler, then k-1 empties to flush it: n+k-1 values, None = placeholder."""
    s: Shuffler[T] = Shuffler(perm)
    for item in items:
        yield s.put(item)
    for _ in range(len(perm) - 1):
        yield s.put(None)


def inverse(perm: list[int]) -> list[int]:
    k = len(perm)
    inv = [0] * k
    for i, p in enumerate(perm):
        inv[p] = (i + k - 1) % k
    return inv


def unshuffle(stream: Iterable[T | None], perm: list[int]) -> Iterator[T]:
    """The original order back from a shuffled stream (placeholders dropped)."""
    for value in shuffle(stream, inverse(perm)):
        if value is not None:
            yield value


# ---- the wishlist ---------------------------------------------------------------------------------
def wishlist(info: SyncInfo, have: Callable[[bytes], bool]) -> Iterator[bytes]:
    """The receiver's bit stream, a byte at a time as each fills (MSB first, last one padded):
    1 for a chunk it lacks and has not asked for already; 0 for placeholders, the empty chunk
    and the rest."""
    asked: set[bytes] = set()
    byte = bits = 0
    for chunk in shuffle(info.chunks, info.perm):
        # the empty chunk is never asked for (a receiver has it), as CAFS's receiver does not
        want = chunk is not None and chunk.size > 0 and chunk.key not in asked and not have(chunk.key)
        if want and chunk is not None:
            asked.add(chunk.key)
        byte = (byte << 1) | want
        bits += 1
        if bits == 8:
            yield bytes([byte])
            byte = bits = 0
    if bits:
        yield bytes([byte << (8 - bits)])


def wishlist_size(positions: int) -> int:
    """A whole wishlist's bytes: one bit per position, rounded up."""
    return (positions + 7) // 8


def check_wishlist_length(data: bytes, positions: int) -> None:
    """A whole wishlist has exactly wishlist_size(positions) bytes."""
    need = wishlist_size(positions)
    if len(data) > need:
        raise SyncError("wishlist too long")
    if len(data) < need:
        raise SyncError("wishlist too short")


def wishlist_bits(data: bytes, positions: int) -> list[bool]:
    """The sender's reading of a wishlist: exactly ceil(positions/8) bytes."""
    check_wishlist_length(data, positions)
    return [bool(data[i >> 3] & (0x80 >> (i & 7))) for i in range(positions)]


# ---- the chunk data stream ------------------------------------------------------------------------
def send(info: SyncInfo, wish: bytes, get: Callable[[ChunkInfo], bytes],
         write: Callable[[bytes], object]) -> int:
    """Stream the requested chunks: varint(length) + bytes each. Returns the bytes of chunk data sent.
    A whole wishlist of the wrong length is refused before anything is sent."""
    check_wishlist_length(wish, info.positions)
    return send_as_read(info, io.BytesIO(wish).read, get, write)


def send_as_read(info: SyncInfo, read: Callable[[int], bytes], get: Callable[[ChunkInfo], bytes],
                 write: Callable[[bytes], object]) -> int:
    """send(), reading the wishlist as it arrives (`read(n)`: up to n bytes, b"" at its end) and
    writing each requested chunk as soon as its bit is known: full duplex, as CAFS's clients expect."""
    positions = info.positions
    need = wishlist_size(positions)
    order = shuffle(info.chunks, info.perm)
    got = sent = 0
    while got < need:
        data = read(min(4096, need - got))
        if not data:
            raise SyncError("wishlist too short")
        for byte in data:
            for bit in range(min(8, positions - got * 8)):
                chunk = next(order)
                if not byte & (0x80 >> bit):
                    continue
                if chunk is None:
                    raise SyncError("receiver requested the empty chunk (a placeholder)")
                payload = get(chunk)
                write(varint(len(payload)) + payload)
                sent += len(payload)
            got += 1
    if read(1):
        raise SyncError("wishlist too long")
    return sent


def receive(info: SyncInfo, wish: bytes, stream: BinaryIO, put: Callable[[ChunkInfo, bytes], object],
            check: Callable[[bytes], bytes] = lambda data: hashlib.sha256(data).digest(),
            progress: Callable[[int], None] | None = None,
            decode: Callable[[bytes], bytes] | None = None) -> int:
    """Read the chunks asked for in `wish`, check each (key = check(data), size), hand them to `put`
    (with what came on the wire: compressed in our mode, where `decode` gives the chunk). Anything
    unexpected is a SyncError: nothing unchecked ever reaches `put`. Returns the count."""
    limit = MAX_CHUNK if decode is None else 2 * info.max_size + 65536
    bits = wishlist_bits(wish, info.positions)
    count = 0
    for chunk, wanted in zip(shuffle(info.chunks, info.perm), bits, strict=True):
        if not wanted or chunk is None:
            continue
        length = read_varint(stream)
        if length is None:
            raise SyncError(f"unexpected end of data: chunk {chunk.key.hex()} missing")
        if not 0 <= length <= limit:
            raise SyncError(f"illegal chunk length {length}")
        wire = stream.read(length)
        if len(wire) != length:
            raise SyncError(f"unexpected end of data inside chunk {chunk.key.hex()}")
        try:
            data = wire if decode is None else decode(wire)
        except PydesyncError as e:
            raise SyncError(f"unexpected chunk {chunk.key.hex()}: {e}") from None
        if len(data) != chunk.size or check(data) != chunk.key:
            raise SyncError(f"unexpected chunk: expected {chunk.key.hex()} ({chunk.size} bytes), "
                            f"got {len(data)} bytes that do not match")
        put(chunk, wire)
        count += 1
        if progress is not None:
            progress(length)
    if stream.read(1):
        raise SyncError("unsolicited chunk data after the last requested chunk")
    return count


# ---- files: serving and fetching over HTTP (httpsync's binding) -----------------------------------
class ServedFile:
    """A local file offered for wishlist transfers: its SyncInfo, and its chunks by key."""

    def __init__(self, path: str, perm: list[int] | None = None):
        self.path = path
        with open(path, "rb") as f:
            self.info, offsets = file_syncinfo(f, perm)
        self.where = {c.key: (o, c.size) for c, o in zip(self.info.chunks, offsets, strict=True)}

    def chunk(self, chunk: ChunkInfo) -> bytes:
        offset, size = self.where[chunk.key]
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size or hashlib.sha256(data).digest() != chunk.key:
            raise SyncError(f"{self.path} changed while it was being served")
        return data

    def stream(self, read: Callable[[int], bytes], write: Callable[[bytes], object]) -> int:
        """Answer a wishlist as it arrives (see send_as_read)."""
        return send_as_read(self.info, read, self.chunk, write)


EMPTY_KEY = hashlib.sha256(b"").digest()


def local_chunks(paths: Iterable[str]) -> dict[bytes, tuple[str, int, int]]:
    """key -> (file, offset, size) for the CAFS chunks of local files (seeds for sync-get)."""
    found: dict[bytes, tuple[str, int, int]] = {}
    for path in paths:
        with open(path, "rb") as f:
            info, offsets = file_syncinfo(f)
        for c, offset in zip(info.chunks, offsets, strict=True):
            found.setdefault(c.key, (path, offset, c.size))
    return found


def rebuild(info: SyncInfo, output_fd: int, wish: bytes, stream: BinaryIO,
            local: dict[bytes, tuple[str, int, int]], progress: Callable[[int], None] | None = None) -> int:
    """Write the file `info` describes into output_fd: chunks that arrive on `stream` (checked) and
    chunks from local files (checked too), each at every offset where it occurs. Returns the
    chunks received."""
    places: dict[bytes, list[int]] = {}
    offset = 0
    for c in info.chunks:
        places.setdefault(c.key, []).append(offset)
        offset += c.size
    os.ftruncate(output_fd, offset)

    def put(chunk: ChunkInfo, data: bytes) -> None:
        for at in places.pop(chunk.key, ()):
            os.pwrite(output_fd, data, at)

    count = receive(info, wish, stream, put, progress=progress)
    for key, offsets in places.items():  # the rest: from local files
        if key == EMPTY_KEY:
            continue  # nothing to write
        if key not in local:
            raise SyncError(f"chunk {key.hex()} neither sent nor available locally")
        path, at, size = local[key]
        with open(path, "rb") as f:
            f.seek(at)
            data = f.read(size)
        if hashlib.sha256(data).digest() != key:
            raise SyncError(f"{path} changed while it was read")
        for dst in offsets:
            os.pwrite(output_fd, data, dst)
    return count


class SyncPeer:
    """The two requests of a wishlist transfer to one URL (httpsync's binding, or /sync/<index>):
    GET the SyncInfo, then POST the whole wishlist with `Connection: close` and read the answer."""

    def __init__(self, url: str, timeout: float = 60):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SyncError(f"not an http(s) URL: {url}")
        self.url = url
        self._kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = (parts.hostname, parts.port)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        self.close()
        self._conn = self._kind(*self._address, timeout=self._timeout)
        return self._conn

    def syncinfo(self, max_size: int = MAX_CHUNK) -> SyncInfo:
        conn = self._connect()
        conn.request("GET", self._target)
        answer = conn.getresponse()
        body = answer.read()
        self.close()
        if answer.status != 200:
            raise SyncError(f"GET {self.url}: status {answer.status}")
        return SyncInfo.from_json(body, max_size)

    def post(self, wish: bytes) -> http.client.HTTPResponse:
        """The answer to the wishlist: a stream of chunk records (open until close())."""
        conn = self._connect()
        conn.request("POST", self._target, body=wish,
                     headers={"Connection": "close", "Content-Type": "application/octet-stream"})
        answer = conn.getresponse()
        if answer.status != 200:
            text = answer.read(200).decode(errors="replace").strip()
            raise SyncError(f"POST {self.url}: status {answer.status}: {text}")
        return answer

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> SyncPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _network_errors(url: str) -> Iterator[None]:
    """Transport failures as one SyncError naming the URL."""
    try:
        yield
    except (OSError, http.client.HTTPException) as e:
        raise SyncError(f"{url}: {e}") from None


def sync_get(url: str, output: str, seeds: Iterable[str] = (), timeout: float = 60,
             progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Fetch the file a sync-serve (or CAFS httpsync) URL offers into `output`: GET its SyncInfo,
    POST the wishlist (whole, with `Connection: close`), rebuild from the answer and the chunks
    the `seeds` (local files) hold. The output is a temporary file renamed at the end."""
    with _network_errors(url), SyncPeer(url, timeout) as peer:
        info = peer.syncinfo()
        local = local_chunks(seeds)
        wish = b"".join(wishlist(info, lambda key: key in local))
        answer = peer.post(wish)
        with atomic_write(output) as f:
            received = rebuild(info, f.fileno(), wish, answer, local, progress)
    unique = {c.key: c.size for c in info.chunks}
    return {"chunks": len(info.chunks), "chunks-received": received,
            "bytes-received": sum(size for key, size in unique.items() if key not in local),
            "bytes-total": sum(c.size for c in info.chunks)}


# ---- our mode: casync chunks from an index, compressed on the wire ---------------------------------
SYNC_PERM = 64  # shuffling window of the SyncInfo a chunk-server offers for an index


def index_syncinfo(index_bytes: bytes, chunks: Iterable[tuple[bytes, int]], max_size: int) -> SyncInfo:
    """The SyncInfo of an index: its chunk ids and sizes, and a permutation derived from the
    index itself, so the GET and the later POST of a client see the same one."""
    perm = list(range(SYNC_PERM))
    random.Random(hashlib.sha256(index_bytes).digest()).shuffle(perm)
    return SyncInfo([ChunkInfo(bytes(key), size) for key, size in chunks], perm, max_size)


def sync_prefetch(url: str, expected: list[tuple[bytes, int]], max_size: int, have: Callable[[bytes], bool],
                  decode: Callable[[bytes], bytes], check: Callable[[bytes], bytes],
                  put: Callable[[bytes, bytes], object], timeout: float = 60) -> int:
    """Our mode's client: GET the SyncInfo at `url` (it must list exactly `expected`, the index's
    chunks), POST the wishlist of chunks `have` lacks as one body, and hand each chunk that
    arrives (as sent: compressed) to put(key, wire) once decode and check prove it is the chunk.
    Returns the chunks received."""
    with _network_errors(url), SyncPeer(url, timeout) as peer:
        info = peer.syncinfo(max_size)
        if [(c.key, c.size) for c in info.chunks] != [(bytes(k), n) for k, n in expected]:
            raise SyncError(f"{url} describes another index than the one being extracted")
        wish = b"".join(wishlist(info, have))
        answer = peer.post(wish)
        return receive(info, wish, answer, lambda c, wire: put(c.key, wire),
                       check=check, decode=decode)
