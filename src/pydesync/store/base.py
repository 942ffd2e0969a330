"""The one interface every chunk store implements, and the checks they share."""

from __future__ import annotations

import atexit
import functools
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..codec import CodecError
from ..digest import SHA512_256, ChunkId, digest_of, other_digest
from ..errors import ChunkInvalid, ChunkMissing, StoreError
from .converters import COMPRESSED, PLAIN, Converters, converters_for
from .options import StoreOptions

if TYPE_CHECKING:
    from ..chunkio import Placement
    from ..index import Index


def verify_chunk(chunk_id: ChunkId, data: bytes, digest: str | None, location: str) -> None:
    """Raise ChunkInvalid unless `data` hashes to `chunk_id`.

    With digest None the default algorithm is tried first and then the other,
    as casync does when no digest was configured.
    """
    first = digest or SHA512_256
    actual = digest_of(data, first)
    if actual == chunk_id:  # the common case: one hash, no further work
        return
    if digest is None and digest_of(data, other_digest(first)) == chunk_id:
        return
    raise ChunkInvalid(chunk_id, f"chunk id {chunk_id} does not match its hash {actual}", location)


def decode_chunk(chunk_id: ChunkId, stored: bytes, converters: Converters | bool, location: str) -> bytes:
    """Turn stored bytes back into chunk data (decrypt, then decompress), naming the chunk if they
    do not decode. `converters` True/False is shorthand for compressed/plain."""
    if converters is True:
        converters = COMPRESSED
    if not converters:
        return stored
    try:
        return converters.decode(stored)
    except CodecError as e:
        raise ChunkInvalid(chunk_id, f"invalid chunk {chunk_id}: {e}", location) from None


_open_at_exit: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    for item in list(_open_at_exit):
        item.close()


def close_at_exit(item: Any) -> None:
    """Close `item` (a store or connection owning processes) at exit if nobody did: no ssh child
    outlives the command, even when a caller forgets close()."""
    _open_at_exit.add(item)


class Store(ABC):
    """A place chunks live, addressed by id. Reads return verified, uncompressed data.

    What a store can do beyond get and has is declared as data with a default, so a caller
    asks once (`store.listable`) instead of probing for methods; the methods behind an
    ability have defaults that work for every store (fetch_many gets one by one, get_stored
    gives the plain chunk) or say clearly that the store cannot (remove, ids).
    """

    location: str = ""
    options: StoreOptions = StoreOptions()
    #: Whether requests wait on a network: then -n threads hide latency; local stores are
    #: CPU-bound (decompress, hash), where more threads than cores only contend.
    remote: bool = False
    #: Whether fetch_many sends every request at once and streams the answers (casync's protocol).
    streams: bool = False
    #: Whether ids() lists the store's chunks (verify, prune).
    listable: bool = False
    #: Whether open_stored() gives a chunk's file on this machine (a server sends it as it is).
    local_files: bool = False
    #: The format chunks are kept in, when get_stored/put_stored pass them as they are (None:
    #: stored bytes are not the store's own, and put_stored decodes them and puts the chunk).
    converters: Converters | None = None

    @abstractmethod
    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        """Chunk data; ChunkMissing if absent, ChunkInvalid if it fails to decode or verify."""

    def checked(self, chunk_id: ChunkId, stored: bytes | bytearray, converters: Converters, where: str,
                digest: str | None = None) -> bytes:
        """Stored bytes as chunk data: decoded (naming the chunk if they do not decode), then hashed
        against the id unless the store's options say skip-verify. Every store's read ends here."""
        data = decode_chunk(chunk_id, stored, converters, where)  # type: ignore[arg-type]  # (a body read into a
        # bytearray passes as bytes: nothing writes to it, and copying every chunk would cost)
        if not self.options.skip_verify:
            verify_chunk(chunk_id, data, digest, where)
        return data

    pipelined = False  # begin_get really sends ahead (else callers want threads for concurrency)

    def begin_get(self, chunk_id: ChunkId, digest: str | None = None) -> Callable[[], bytes]:
        """Start fetching a chunk; the returned call finishes it (same result and errors as get).

        Network stores send the request now so that several are in flight from one thread while
        it decodes another chunk; the default simply defers to get()."""
        return functools.partial(self.get, chunk_id, digest)

    def begin_place(self, chunk_id: ChunkId, digest: str | None,
                    placement: Placement) -> Callable[[], bytes | None]:
        """Start fetching a chunk that goes to `placement`; the call returned either writes it
        there, verified, and returns None, or returns its verified data for the caller to write.

        Stores whose stored bytes the native path reads (local files, HTTP bodies; zstd or
        plain, not encrypted) decode, verify and write a chunk in one call without the GIL;
        the default fetches as begin_get does."""
        return self.begin_get(chunk_id, digest)

    @abstractmethod
    def has(self, chunk_id: ChunkId) -> bool:
        """Whether the chunk is present (without reading it)."""

    def put(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        """Store chunk data (the store applies its own encoding). Idempotent."""
        raise StoreError(f"store {self.location} is read-only")

    def fetch_many(self, ids: Sequence[ChunkId],
                   digest: str | None = None) -> Iterator[tuple[ChunkId, bytes | None]]:
        """Every chunk of `ids` (each once), verified, as it arrives; None for one the store lacks.
        Stores that `stream` send all the requests at once; the default gets them in turn."""
        for chunk_id in dict.fromkeys(ids):
            try:
                yield chunk_id, self.get(chunk_id, digest)
            except ChunkMissing:
                yield chunk_id, None

    def get_stored(self, chunk_id: ChunkId) -> tuple[bytes, Converters]:
        """The chunk as stored, and the format it is in (for servers passing it on without
        re-encoding; not verified where the store keeps a format of its own). The default is
        the verified plain chunk."""
        return self.get(chunk_id), PLAIN

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        """Store a chunk given as stored bytes in `fmt` (None: in the store's own `converters`),
        kept as they are where that is the store's format. The default decodes them and puts
        the chunk; the caller has verified it."""
        if fmt is None:
            fmt = self.converters or PLAIN
        self.put(chunk_id, decode_chunk(chunk_id, bytes(stored), fmt, self.location))

    def in_own_format(self, chunk_id: ChunkId, stored: bytes | memoryview,
                      fmt: Converters | None) -> bytes | memoryview:
        """Stored bytes in `fmt` as this store keeps them: as they are when the formats agree
        (None: they already do), else converted through the layers the two do not share."""
        own = self.converters or PLAIN
        if fmt is None or fmt == own:
            return stored
        try:
            return fmt.convert(bytes(stored), own)
        except CodecError as e:
            raise ChunkInvalid(chunk_id, f"invalid chunk {chunk_id}: {e}", self.location) from None

    def open_stored(self, chunk_id: ChunkId) -> tuple[int, int, Converters]:
        """(open fd, size, format) of the chunk's file, for stores with `local_files`."""
        raise StoreError(f"store {self.location} keeps no chunk files on this machine")

    def remove(self, chunk_id: ChunkId) -> None:
        raise StoreError(f"store {self.location} does not support removing chunks")

    def ids(self) -> Iterator[ChunkId]:
        raise StoreError(f"store {self.location} cannot list its chunks")

    def remove_temporaries(self) -> None:  # noqa: B027 - optional hook
        """Remove what interrupted writes left (prune does); the default store leaves nothing."""

    def stored_size(self, chunk_id: ChunkId) -> int | None:
        """Size of the chunk as stored (compressed), or None if unknown or absent."""
        return None

    @property
    def writable(self) -> bool:
        return False

    #: Whether put() only queues chunks for flush(), the far side deciding then what it lacks:
    #: writers then skip has(), which would cost a round trip per chunk.
    buffers_writes: bool = False

    def flush(self, index: Index | None = None, index_location: str | None = None) -> bool:
        """Deliver the chunks put so far (stores that hold writes back; the default holds none).
        Called by writers before they write the index; True if the store wrote the index at
        `index_location` itself, with the chunks (casync's remote takes the two together)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles; the default has none."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return self.location


class FormattedStore(Store):
    """A store that keeps chunks in the format its options give (compressed or not, encrypted or
    not) under names that end in that format's extension: put encodes and hands the bytes to
    put_stored, the one write each kind implements."""

    converters: Converters

    def __init__(self, location: str, options: StoreOptions | None):
        self.location = location
        self.options = options or StoreOptions()
        self.converters = converters_for(self.options)  # (validates the encryption settings first)
        self._suffix = self.converters.extension

    def put(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        self.put_stored(chunk_id, self.converters.encode(data))

    @abstractmethod
    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        """Write the chunk's stored bytes (in `fmt`, None: in the store's own format)."""
