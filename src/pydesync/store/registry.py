"""One table from a location's scheme to its kind of store: how a chunk store there opens, and how
an index there is read and written (desync's rule: `http://h/p/x.caibx` is `x.caibx` in the index
store `http://h/p/`).

A kind's module is imported only when a location of its scheme is used: boto3 or paramiko cost
time to import, and a user of local stores need not have them. A new kind is a module that
defines a `StoreKind` named KIND and one line in `_MODULES`.
"""

from __future__ import annotations

import importlib
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


# scheme -> the module (of this package) that defines its KIND; None: a local path
_MODULES: dict[str, str] = {
    "http": "http", "https": "http", "ssh": "ssh", "sftp": "sftp", "s3+http": "s3", "s3+https": "s3",
    "gs": "gcs", "oci+http": "oci", "oci+https": "oci",
}


def store_kind(location: str) -> StoreKind:
    """The kind of store at `location` (UsageError for a scheme no kind serves)."""
    scheme = location_scheme(location)
    if scheme is None:
        return _local()
    module = _MODULES.get(scheme)
    if module is None:
        raise UsageError(f"unsupported store location '{location}'")
    kind: StoreKind = importlib.import_module(f".{module}", __package__).KIND
    return kind
