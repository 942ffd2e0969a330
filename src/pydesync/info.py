"""info and inspect-chunks: what an index holds and how much of it stores and seeds already have."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .digest import ChunkId
from .errors import PydesyncError
from .index import Index
from .parallel import DEFAULT_CONCURRENCY, ordered_map
from .store.base import Store


@dataclass
class InspectedChunk:
    id: ChunkId
    uncompressed_size: int
    compressed_size: int | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": str(self.id), "uncompressed_size": self.uncompressed_size}
        if self.compressed_size:
            out["compressed_size"] = self.compressed_size
        return out


def inspect_chunks(index: Index, store: Store | None = None) -> list[InspectedChunk]:
    """One entry per index chunk, in order, with its stored (compressed) size when a store is given."""
    sizes: dict[ChunkId, int | None] = {}
    out = []
    for chunk in index:
        if store is not None and chunk.id not in sizes:
            sizes[chunk.id] = store.stored_size(chunk.id)
        out.append(InspectedChunk(chunk.id, chunk.size, sizes.get(chunk.id)))
    return out


def _present(ids: list[ChunkId], store: Store | None, concurrency: int) -> set[ChunkId]:
    if store is None:
        return set()

    # desync counts a store's errors as absence; an unreachable store is not an empty one: the
    # first error is the command's.
    return {i for i, ok in zip(ids, ordered_map(store.has, ids, concurrency), strict=True) if ok}


def index_info(index: Index, store: Store | None = None, seeds: Sequence[Index] = (),
               cache: Store | None = None, chunks_info: Sequence[dict[str, object]] | None = None,
               concurrency: int = DEFAULT_CONCURRENCY, partial: set[ChunkId] | None = None) -> dict[str, int]:
    """desync's `info` figures, with its JSON field names and order. `partial`: the chunks an
    interrupted extract left in its partial output (checked), then counted as `in-partial` and,
    since the next extract takes them from there, as held by a seed."""
    unique = index.unique_ids()
    size_of = {c.id: c.size for c in index}
    in_store = _present(unique, store, concurrency)
    in_cache = _present(unique, cache, concurrency)
    in_seed = {c.id for seed in seeds for c in seed} & set(size_of)
    in_partial = (partial or set()) & set(size_of)
    not_in_seed = [i for i in unique if i not in in_seed and i not in in_partial]
    neither = [i for i in not_in_seed if i not in in_cache]
    return {
        "total": len(index),
        "unique": len(unique),
        "in-store": len(in_store),
        "in-seed": len(in_seed),
        **({"in-partial": len(in_partial)} if partial is not None else {}),
        "in-cache": len(in_cache),
        "not-in-seed-nor-cache": len(neither),
        "size": index.length,
        "dedup-size-not-in-seed": sum(size_of[i] for i in not_in_seed),
        "dedup-size-not-in-seed-nor-cache": sum(size_of[i] for i in neither),
        "dedup-size-not-in-seed-nor-cache-compressed": _compressed_total(neither, size_of, chunks_info),
        "chunk-size-min": index.sizes.min,
        "chunk-size-avg": index.sizes.avg,
        "chunk-size-max": index.sizes.max,
    }


def _compressed_total(ids: list[ChunkId], size_of: dict[ChunkId, int],
                      chunks_info: Sequence[dict[str, object]] | None) -> int:
    """Sum of compressed sizes from an inspect-chunks file; 0 if any needed size is unknown."""
    if not chunks_info:
        return 0
    known: dict[str, int] = {}
    for entry in chunks_info:
        cid = str(entry.get("id"))
        usize = entry.get("uncompressed_size")
        try:
            expected = size_of.get(ChunkId(cid))
        except ValueError:
            raise PydesyncError(f"invalid chunk id {cid!r} in chunks info") from None
        if expected is not None and usize is not None and usize != expected:
            raise PydesyncError(f"chunk {cid}: uncompressed size {usize} in chunks info, "
                                f"index says {expected}")
        csize = entry.get("compressed_size")
        if isinstance(csize, int) and csize > 0:
            known[cid] = csize
    total = 0
    for chunk_id in ids:
        if str(chunk_id) not in known:
            return 0
        total += known[str(chunk_id)]
    return total
