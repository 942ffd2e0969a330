"""Chunk stores behind one interface, and the factory that opens them from a location string.

Locations: a directory path (local store); `a|b` a failover group. Remote kinds
(`http://`, `ssh://`, `sftp://`, `s3+http://`, ...) plug in here as they land.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ..errors import StoreError, UsageError
from .base import Store, StoreOptions, verify_chunk
from .local import LocalStore
from .router import CachedStore, FailoverGroup, StoreRouter

REMOTE_SCHEMES = ("http", "https", "ssh", "sftp", "s3+http", "s3+https", "gs", "oci+http", "oci+https")


def location_scheme(location: str) -> str | None:
    """The URL scheme of a location, or None for a local path (one-letter schemes are drive letters)."""
    head, sep, _ = location.partition("://")
    if sep and len(head) > 1 and "/" not in head:
        return head.lower()
    return None


def open_store(location: str, options: StoreOptions | None = None, create: bool = False) -> Store:
    """Open one store (or a failover group `a|b`) from its location string."""
    if "|" in location:
        return FailoverGroup([open_store(m, options, create) for m in location.split("|") if m])
    scheme = location_scheme(location)
    if scheme is None:
        return LocalStore(os.path.expanduser(location), options, create=create)
    if scheme in ("http", "https"):
        from .http import HttpStore

        return HttpStore(location, options)
    if scheme == "ssh":
        from .ssh import SshStore

        return SshStore(location, options)
    if scheme == "sftp":
        from .sftp import SftpStore

        return SftpStore(location, options, create=create)
    if scheme in ("s3+http", "s3+https"):
        from .s3 import S3Store

        return S3Store(location, options)
    if scheme == "gs":
        from .s3 import S3Store, gcs_location

        return S3Store(gcs_location(location), options)
    if scheme in ("oci+http", "oci+https"):
        from .oci import OciStore

        return OciStore(location, options)
    raise UsageError(f"unsupported store location '{location}'")


def open_chain(locations: Sequence[str], cache: str | None = None, repair: bool = True,
               options_for: object = None, on_cache_lookup: Callable[[bool], None] | None = None) -> Store:
    """Stores tried in order, optionally behind a writable cache (the `-s ... -c ...` of desync);
    `on_cache_lookup(hit)` hears of every read through the cache."""
    if not locations:
        raise UsageError("no store provided")
    opts = options_for if callable(options_for) else (lambda _loc: None)
    stores: list[Store] = []
    try:  # a store that fails to open must not leave the others' connections behind
        for loc in locations:
            stores.append(open_store(loc, opts(loc)))
        chain: Store = stores[0] if len(stores) == 1 else StoreRouter(stores)
        if cache:
            cache_store = open_store(cache, opts(cache), create=True)
            chain = CachedStore(cache_store, chain, repair=repair, on_lookup=on_cache_lookup)
    except BaseException:
        for store in stores:
            store.close()
        raise
    return chain


__all__ = [
    "CachedStore", "FailoverGroup", "LocalStore", "Store", "StoreError", "StoreOptions", "StoreRouter",
    "location_scheme", "open_chain", "open_store", "verify_chunk",
]
