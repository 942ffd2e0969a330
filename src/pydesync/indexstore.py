"""Where indexes live: a local path, `-` (stdin/stdout), or a URL of an index store.

desync's rule: the last path element is the index name, the rest is the index
store (`http://h/p/x.caibx` is `x.caibx` in the store `http://h/p/`).
"""

from __future__ import annotations

from .errors import IndexFormatError
from .index import MAX_INDEX_BYTES
from .store import location_scheme
from .store.base import StoreOptions


def split_location(location: str) -> tuple[str, str]:
    """(store base, index name) of an index location."""
    base, _, name = location.rpartition("/")
    return base + "/", name


def fetch_index_bytes(location: str, options: StoreOptions | None = None) -> bytes:
    """The bytes of a remote index (HTTP(S), SFTP, S3)."""
    scheme = location_scheme(location)
    if scheme in ("http", "https"):
        from .store.http import HttpClient

        base, name = split_location(location)
        client = HttpClient(base, options or StoreOptions())
        try:
            data = client.request("GET", name, limit=MAX_INDEX_BYTES)
        finally:
            client.close()
        if data is None:
            raise IndexFormatError(f"index {location} does not exist")
        return data
    if scheme in ("sftp", "s3+http", "s3+https", "gs"):
        if scheme == "sftp":
            from .store.sftp import read_index_bytes
        else:
            from .store.s3 import read_index_bytes

        data = read_index_bytes(location, options)
        if data is None:
            raise IndexFormatError(f"index {location} does not exist")
        return data
    raise IndexFormatError(f"cannot read an index from '{location}': unsupported location")


def store_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    scheme = location_scheme(location)
    if scheme in ("http", "https"):
        from .store.http import HttpClient

        base, name = split_location(location)
        client = HttpClient(base, options or StoreOptions())
        try:
            client.request("PUT", name, body=data, ok=(200, 201, 204), missing=())
        finally:
            client.close()
        return
    if scheme == "sftp":
        from .store.sftp import write_index_bytes

        write_index_bytes(location, data, options)
        return
    if scheme in ("s3+http", "s3+https", "gs"):
        from .store.s3 import write_index_bytes as write_s3

        write_s3(location, data, options)
        return
    raise IndexFormatError(f"cannot write an index to '{location}': unsupported location")


def is_remote(location: str) -> bool:
    return location != "-" and location_scheme(location) is not None
