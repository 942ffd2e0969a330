"""pydesync: casync's formats and desync's command line, in Python with a C chunker.

The library API (the CLI is a thin layer over it)::

    import pydesync
    store = pydesync.open_store("demo.castr", create=True)
    index, stats = pydesync.make("demo.caibx", "disk.img", store=store)
    pydesync.extract(pydesync.read_index("demo.caibx"), "copy.img", store)

`read_index` / `write_index` take a path or `-`; `read_index_at` / `write_index_at` also take an
index store URL (`https://host/indexes/demo.caibx`, `sftp://`, `s3+https://`, `gs://`).
"""

from .blobreader import BlobReader
from .chunker import ChunkSizes, chunk_bytes, iter_chunks
from .digest import SHA256, SHA512_256, ChunkId, digest_of
from .errors import (
    ChunkInvalid,
    ChunkMissing,
    IndexFormatError,
    PydesyncError,
    StoreError,
    UsageError,
)
from .extract import ExtractStats, extract
from .index import Index, IndexChunk, parse_index, read_index, write_index
from .indexstore import read_index_at, write_index_at
from .make import MakeStats, chunk_stream, make
from .store import (
    CachedStore,
    FailoverGroup,
    LocalStore,
    Store,
    StoreOptions,
    StoreRouter,
    open_chain,
    open_store,
)

__version__ = "0.1.0"

__all__ = [
    "SHA256", "SHA512_256", "BlobReader", "CachedStore", "ChunkId", "ChunkInvalid", "ChunkMissing",
    "ChunkSizes", "ExtractStats", "FailoverGroup", "Index", "IndexChunk", "IndexFormatError", "LocalStore",
    "MakeStats", "PydesyncError", "Store", "StoreError", "StoreOptions", "StoreRouter", "UsageError",
    "chunk_bytes", "chunk_stream", "digest_of", "extract", "iter_chunks", "make", "open_chain",
    "open_store", "parse_index", "read_index", "read_index_at", "write_index", "write_index_at",
]
