"""Chunk stores behind one interface, and the factory that opens them from a location string.

Locations: a directory path (local store), a URL whose scheme names a kind of store (see
registry.py: `http(s)://`, `ssh://`, `sftp://`, `s3+http(s)://`, `gs://`, `oci+http(s)://`), or
`a|b`, a failover group of those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import StoreError, UsageError
from .base import Store, verify_chunk
from .local import LocalStore
from .options import StoreOptions
from .registry import location_scheme, store_kind
from .router import CachedStore, FailoverGroup, StoreRouter


def open_store(location: str, options: StoreOptions | None = None, create: bool = False) -> Store:
    """Open one store (or a failover group `a|b`) from its location string."""
    if "|" in location:
        return FailoverGroup([open_store(m, options, create) for m in location.split("|") if m])
    return store_kind(location).open(location, options, create)


def open_chain(locations: Sequence[str], cache: str | None = None, repair: bool = True,
               options_for: Callable[[str], StoreOptions | None] | None = None,
               on_cache_lookup: Callable[[bool], None] | None = None) -> Store:
    """Stores tried in order, optionally behind a writable cache (the `-s ... -c ...` of desync);
    `on_cache_lookup(hit)` hears of every read through the cache."""
    if not locations:
        raise UsageError("no store provided")
    opts = options_for or (lambda _loc: None)
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
