"""Where indexes live: a local path, `-` (stdin/stdout), or a URL of an index store.

desync's rule: the last path element is the index name, the rest is the index
store (`http://h/p/x.caibx` is `x.caibx` in the store `http://h/p/`).

`read_index_at` / `write_index_at` take any of these; `index.read_index` / `index.write_index`
only paths and `-`, so the index format does not depend on the stores (which would be an import
cycle: the stores' clients are what fetch a remote index).
"""

from __future__ import annotations

from .errors import IndexFormatError, UsageError
from .index import Index, check_index_digest, parse_index, read_index, write_index
from .store.base import Store
from .store.options import StoreOptions
from .store.registry import StoreKind, location_scheme, store_kind


def _index_kind(location: str) -> StoreKind:
    try:
        return store_kind(location)
    except UsageError:
        raise IndexFormatError(f"unsupported index location '{location}'") from None


def fetch_index_bytes(location: str, options: StoreOptions | None = None) -> bytes:
    """The bytes of an index in an index store (HTTP(S), SFTP, S3, GCS, ssh)."""
    read = _index_kind(location).read_index
    if read is None:
        raise IndexFormatError(f"cannot read an index from '{location}': unsupported location")
    data = read(location, options)
    if data is None:
        raise IndexFormatError(f"index {location} does not exist")
    return data


def store_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    """Put the bytes of an index into an index store (HTTP(S), SFTP, S3, GCS, ssh)."""
    write = _index_kind(location).write_index
    if write is None:
        raise IndexFormatError(f"cannot write an index to '{location}': unsupported location")
    write(location, data, options)


def is_remote(location: str) -> bool:
    """Whether the location is an index store URL rather than a local path or `-`."""
    return location != "-" and location_scheme(location) is not None


def read_index_at(location: str, digest: str | None = None, options: StoreOptions | None = None) -> Index:
    """An index from a path, `-` (stdin) or an index store URL (read with `options`).

    With `digest`, an index made with the other digest is rejected (as desync does);
    without, the index's own flag decides (as casync does).
    """
    if not is_remote(location):
        return read_index(location, digest)
    index = parse_index(fetch_index_bytes(location, options), location)
    return index if digest is None else check_index_digest(index, digest, location)


def write_index_at(index: Index, location: str, options: StoreOptions | None = None,
                   store: Store | None = None) -> None:
    """Write an index to a path (atomically), to `-` (stdout) or into an index store (with `options`),
    once `store` (where its chunks went) has delivered what it holds back, which may include
    writing the index itself (casync's remote takes an index and its chunks together)."""
    if store is not None and store.flush(index, location):
        return
    if is_remote(location):
        store_index_bytes(location, index.to_bytes(), options)
    else:
        write_index(index, location)


__all__ = [
    "fetch_index_bytes", "is_remote", "read_index_at", "store_index_bytes",
    "write_index_at",
]
