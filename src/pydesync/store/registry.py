"""One table from a location's scheme to its kind of store: how a chunk store there opens, and how
an index there is read and written (desync's rule: `http://h/p/x.caibx` is `x.caibx` in the index
store `http://h/p/`).

A kind's module is imported only when a location of its scheme is used: boto3 or paramiko cost
time to import, and a user of local stores need not have them. A new kind is a module that
defines a `StoreKind` and one line in `_KINDS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from .base import Store
from .options import StoreOptions


@dataclass(frozen=True)
class StoreKind:
    """What one scheme's locations can be: always a chunk store; an index store where it can read
    (None: the index does not exist) and write index files."""

    name: str
    open: Callable[[str, StoreOptions | None, bool], Store]  # (location, options, create)
    read_index: Callable[[str, StoreOptions | None], bytes | None] | None = None
    write_index: Callable[[str, bytes, StoreOptions | None], None] | None = None


def location_scheme(location: str) -> str | None:
    """The URL scheme of a location, or None for a local path (one-letter schemes are drive letters)."""
    head, sep, _ = location.partition("://")
    if sep and len(head) > 1 and "/" not in head:
        return head.lower()
    return None


def _local() -> StoreKind:
    from .local import LocalStore

    def open_local(location: str, options: StoreOptions | None, create: bool) -> Store:
        return LocalStore(os.path.expanduser(location), options, create)

    return StoreKind("local", open_local)


def _http() -> StoreKind:
    from .http import KIND

    return KIND


def _ssh() -> StoreKind:
    from .ssh import KIND

    return KIND


def _sftp() -> StoreKind:
    from .sftp import KIND

    return KIND


def _s3() -> StoreKind:
    from .s3 import KIND

    return KIND


def _gcs() -> StoreKind:
    from .gcs import KIND

    return KIND


def _oci() -> StoreKind:
    from .oci import KIND

    return KIND


_KINDS: dict[str | None, Callable[[], StoreKind]] = {
    None: _local, "http": _http, "https": _http, "ssh": _ssh, "sftp": _sftp, "s3+http": _s3, "s3+https": _s3,
    "gs": _gcs, "oci+http": _oci, "oci+https": _oci,
}


def store_kind(location: str) -> StoreKind:
    """The kind of store at `location` (UsageError for a scheme no kind serves)."""
    loader = _KINDS.get(location_scheme(location))
    if loader is None:
        raise UsageError(f"unsupported store location '{location}'")
    return loader()
