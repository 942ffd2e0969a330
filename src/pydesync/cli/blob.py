"""Blob commands: make, extract, cat, chunk, chop, verify-index."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import nullcontext

from ..blobreader import BlobReader
from ..chunker import ChunkSizes, iter_chunks
from ..digest import ChunkId, check_digest, digest_of, null_chunk_id
from ..errors import UsageError
from ..extract import ExtractStats, extract, stream_blob
from ..fsutil import atomic_write
from ..index import Index, IndexChunk
from ..make import chunk_stream, input_size, open_input
from ..partial import is_partial_index
from ..seed import INVALID_FAIL, INVALID_REGENERATE, INVALID_SKIP, Seed
from ..store import Store, StoreRouter
from ..store.converters import COMPRESSED
from ..store.local import LocalStore
from .common import Context, add_ignore, add_seeds, add_store_options, add_stores, check_index_output
from .ignore import ignored_ids
from .progress import Progress


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("make", parents=[parent], help="chunk a file and write an index",
                       description="Chunk FILE, store its chunks in the -s store (if given) and write "
                                   "INDEX (a .caibx, byte-identical to what casync make writes). "
                                   "INDEX '-' writes to stdout, FILE '-' reads stdin.")
    p.add_argument("index")
    p.add_argument("file")
    add_stores(p, help="target store (created if missing)", cache=False)
    p.add_argument("-m", "--chunk-size", default="16:64:256", help="min:avg:max chunk size in KiB")
    p.add_argument("--print-stats", action="store_true", help="print chunking statistics (JSON) to stderr")
    add_store_options(p)
    p.set_defaults(func=run_make)

    p = sub.add_parser("extract", parents=[parent], help="assemble a blob from an index",
                       description="Read INDEX and write the blob it describes to OUTPUT, fetching "
                                   "chunks from the -s stores in order. OUTPUT is written to a temporary "
                                   "file and renamed, unless -k. An archive index (.caidx) is unpacked "
                                   "as a directory tree into OUTPUT, as casync extract does (existing "
                                   "entries are replaced), unless OUTPUT ends in .catar: then the archive "
                                   "stream itself is written.")
    p.add_argument("index")
    p.add_argument("output")
    add_stores(p)
    add_seeds(p)
    p.add_argument("--skip-invalid-seeds", action="store_true", help="skip seeds that don't match their data")
    p.add_argument("--regenerate-invalid-seeds", action="store_true", help="re-chunk invalid seeds")
    p.add_argument("-k", "--in-place", action="store_true",
                   help="write into OUTPUT directly, keeping chunks that are already correct")
    p.add_argument("--no-resume", action="store_true",
                   help="discard what an interrupted extract of OUTPUT left (.OUTPUT.partial) instead of "
                        "taking it up")
    p.add_argument("--sync", metavar="URL",
                   help="first fetch every chunk that no seed, -c cache or interrupted extract's partial "
                        "holds in one round trip from a chunk-server's /sync/<index name> (remotesync "
                        "wishlist transfer)")
    p.add_argument("--print-stats", action="store_true", help="print statistics (JSON) to stdout")
    add_store_options(p)
    p.set_defaults(func=run_extract)

    p = sub.add_parser("cat", parents=[parent], help="stream a blob to stdout or a file",
                       description="Write the bytes INDEX describes (or a range of them) to OUTPUT "
                                   "or stdout.")
    p.add_argument("index")
    p.add_argument("output", nargs="?")
    add_stores(p)
    p.add_argument("-o", "--offset", type=int, default=0, help="offset in bytes to start from")
    p.add_argument("-l", "--length", type=int, default=0, help="number of bytes (0 = to the end)")
    add_store_options(p)
    p.set_defaults(func=run_cat)

    p = sub.add_parser("chunk", parents=[parent], help="print chunk boundaries of a file",
                       description="Chunk FILE and print '<start>\\t<size>\\t<id>' per chunk; "
                                   "nothing is stored.")
    p.add_argument("file")
    p.add_argument("-m", "--chunk-size", default="16:64:256", help="min:avg:max chunk size in KiB")
    p.add_argument("-S", "--start", type=int, default=0, help="byte offset to start chunking at")
    p.set_defaults(func=run_chunk)

    p = sub.add_parser("chop", parents=[parent], help="store the chunks of a file cut by an index",
                       description="Cut FILE at the boundaries INDEX gives, check every piece against "
                                   "its id and store the missing ones in -s.")
    p.add_argument("index")
    p.add_argument("file")
    add_stores(p, help="target store", cache=False)
    add_ignore(p)
    add_store_options(p)
    p.set_defaults(func=run_chop)

    p = sub.add_parser("verify-index", parents=[parent], help="check a file against an index",
                       description="Hash FILE chunk by chunk and compare with INDEX.")
    p.add_argument("index")
    p.add_argument("file")
    add_store_options(p)
    p.set_defaults(func=run_verify_index)



def _single_target(ctx: Context, create: bool) -> Store | None:
    stores = ctx.args.store
    if not stores:
        return None
    if len(stores) > 1:
        raise UsageError("only one target store can be given")
    return ctx.target(stores[0], create=create)


def run_make(ctx: Context) -> int:
    a = ctx.args
    sizes = ChunkSizes.parse_kib(a.chunk_size)
    digest = check_digest(ctx.digest)
    ctx.index_options(a.index)  # an index store that refuses its options fails before any work
    # A bad input (or an index path that is not one) must not leave a new, empty store behind.
    with open_input(a.file) as reader:
        check_index_output(a.index, a.file)
        with _single_target(ctx, create=True) or nullcontext() as store, \
                Progress("Chunking ", input_size(reader), unit="bytes") as bar:
            index, stats = chunk_stream(reader, sizes, digest, store, ctx.concurrency,
                                        progress=bar.callback())
            ctx.write_index(index, a.index, store)
    if a.print_stats:
        print(json.dumps({"ChunksAccepted": stats.chunks, "ChunksProduced": stats.chunks}, indent=2),
              file=sys.stderr)  # as desync prints it (indented), on stderr: stdout may hold the index
    return 0


def run_extract(ctx: Context) -> int:
    a = ctx.args
    if a.skip_invalid_seeds and a.regenerate_invalid_seeds:
        raise UsageError("--skip-invalid-seeds and --regenerate-invalid-seeds are mutually exclusive")
    if a.index != "-" and os.path.abspath(a.index) == os.path.abspath(a.output):
        raise UsageError("input and output filenames match")
    index = ctx.read_index(a.index)
    seeds = seeds_from_flags(ctx, a.seed, a.seed_dir, a.index)
    with contextlib.ExitStack() as cleanup:
        store = ctx.source()
        sync = functools.partial(_sync, ctx, index, cleanup) if a.sync else None
        return _extract_with(ctx, index, store, seeds, sync)


Sync = Callable[[Iterable[IndexChunk]], "Store | None"]


def _sync(ctx: Context, index: Index, cleanup: contextlib.ExitStack,
          missing: Iterable[IndexChunk]) -> Store | None:
    """extract --sync: the chunks `missing` (those no seed, null chunk or partial output covers)
    that the -c cache lacks too, in one wishlist transfer, into the cache (or a temporary store
    beside the output, removed afterwards). Returns the temporary store to read first, if one
    was used."""
    from ..remotesync import sync_prefetch
    a = ctx.args
    wanted = {bytes(c.id) for c in missing}
    if a.cache:
        target: Store = cleanup.enter_context(ctx.target(a.cache, create=True))
    else:
        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".pydesync-sync-",
                                                                   dir=os.path.dirname(os.path.abspath(a.output))))
        target = cleanup.enter_context(LocalStore(folder, create=True))

    def have(key: bytes) -> bool:
        return key not in wanted or (a.cache is not None and target.has(ChunkId(key)))

    sync_prefetch(a.sync, [(bytes(c.id), c.size) for c in index], index.sizes.max, have,
                  decode=COMPRESSED.decode, check=lambda data: bytes(digest_of(data, index.digest)),
                  put=lambda key, wire: target.put_stored(ChunkId(key), wire, COMPRESSED))
    return None if a.cache else target


def _synced(sync: Sync | None, index: Index, seeds: list[Seed], store: Store) -> Store:
    """`store`, read after what --sync brought of the chunks that neither a seed index nor the
    null chunk covers (a streamed blob or a tree: no output file to check)."""
    if sync is None:
        return store
    null = null_chunk_id(index.sizes.max, index.digest)
    held = {k for s in seeds for k in s.positions}
    extra = sync(c for c in index if c.id != null and c.id not in held)
    return store if extra is None else StoreRouter([extra, store])


def _extract_with(ctx: Context, index: Index, store: Store, seeds: list[Seed], sync: Sync | None) -> int:
    a = ctx.args
    if a.index.endswith(".caidx") and a.output != "-" and not a.output.endswith(".catar"):
        return _extract_tree(ctx, index, _synced(sync, index, seeds, store))
    mode = INVALID_SKIP if a.skip_invalid_seeds else INVALID_REGENERATE if a.regenerate_invalid_seeds \
        else INVALID_FAIL
    with store, Progress("Attempt 1: Assembling ", len(index)) as bar:
        if a.output == "-":  # the blob in order on standard output (as casync does; RAUC reads it)
            stats = stream_blob(index, sys.stdout.buffer, _synced(sync, index, seeds, store), ctx.concurrency,
                                seeds, bar.callback())
        else:
            stats = extract(index, a.output, store, concurrency=ctx.concurrency, in_place=a.in_place,
                            seeds=seeds, invalid_seeds=mode, progress=bar.callback(), resume=not a.no_resume,
                            prefetch=sync)
    if a.print_stats:  # (on stderr when the blob itself goes to stdout)
        print(json.dumps(stats.as_json(), indent=2), file=sys.stderr if a.output == "-" else sys.stdout)
    return 0


def seeds_from_flags(ctx: Context, specs: list[str], folders: list[str], target_index: str) -> list[Seed]:
    """--seed INDEX.caibx (blob beside it) or INDEX:BLOB[:options], then every INDEX.caibx with its
    blob under each --seed-dir (not the index being extracted, nor interrupted extracts' partials:
    their chunks may be anything, and the extract to their target checks them one by one)."""
    seeds = []
    for spec in specs:
        if spec.endswith(".caibx"):
            index_name, blob = spec, spec[: -len(".caibx")]
        else:
            index_name, sep, rest = spec.partition(":")
            if not sep or not rest:
                raise UsageError(f"invalid seed '{spec}': expected INDEX.caibx or INDEX:BLOB")
            blob = rest.split(":", 1)[0]
        seed_index = ctx.read_index(index_name)  # a missing index is named as such
        if not os.path.exists(blob):
            raise UsageError(f"seed data {blob} for {index_name} does not exist (use --seed INDEX:BLOB)")
        seeds.append(Seed(index_name, blob, seed_index))
    own = os.path.abspath(target_index)
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"--seed-dir {folder} is not a directory")
        for root, _dirs, files in sorted(os.walk(folder)):
            for name in sorted(files):
                path = os.path.join(root, name)
                if not name.endswith(".caibx") or os.path.abspath(path) == own or is_partial_index(name):
                    continue
                blob = path[: -len(".caibx")]
                if os.path.isfile(blob) or (os.path.exists(blob) and os.path.isfile(os.path.realpath(blob))):
                    seeds.append(Seed(path, blob, ctx.read_index(path)))
    return seeds


def _extract_tree(ctx: Context, index, store) -> int:
    """An archive index: unpack the tree into the output directory, as `casync extract` does
    (existing entries are replaced, like a blob's output file is)."""
    from ..catar.extractor import ExtractOptions
    from ..partial import resumable_chunks
    from ..streams import IterReader
    from .archive import extract_tree

    a = ctx.args
    with store:
        if a.in_place:
            raise UsageError("-k/--in-place does not apply to archive indexes (.caidx)")
        with resumable_chunks(a.output, store, resume=not a.no_resume) as source:
            pieces = BlobReader(index, source, ctx.concurrency).iter_range()
            extract_tree(IterReader(pieces), a.index, a.output, ExtractOptions(overwrite=True))
    if a.print_stats:
        stats = ExtractStats(bytes_total=index.length, chunks_total=len(index), chunks_from_store=len(index))
        print(json.dumps(stats.as_json(), indent=2))
    return 0


def run_cat(ctx: Context) -> int:
    a = ctx.args
    if a.offset < 0 or a.length < 0:
        raise UsageError("offset and length must not be negative")
    index = ctx.read_index(a.index)
    store = ctx.source()
    reader = BlobReader(index, store, ctx.concurrency)
    output = a.output or "-"
    with store:
        try:
            with atomic_write(output) as out:  # a failure leaves the old file (or none)
                for piece in reader.iter_range(a.offset, a.length):
                    out.write(piece)
        except OSError as e:
            if e.filename is None and output == "-":
                raise
            raise UsageError(f"cannot write {output}: {e.strerror}") from None
    return 0


def run_chunk(ctx: Context) -> int:
    a = ctx.args
    sizes = ChunkSizes.parse_kib(a.chunk_size)
    digest = check_digest(ctx.digest)
    out = sys.stdout
    with open_input(a.file) as f:
        if a.start:
            f.seek(a.start)
        for offset, data in iter_chunks(f, sizes):
            out.write(f"{a.start + offset}\t{len(data)}\t{digest_of(data, digest)}\n")
    return 0


def run_chop(ctx: Context) -> int:
    from ..storeops import chop
    a = ctx.args
    store = _single_target(ctx, create=True)
    if store is None:
        raise UsageError("no target store provided")
    with store:
        index = ctx.read_index(a.index)
        chop(index, a.file, store, ignore=ignored_ids(a.ignore, a.ignore_chunks, ctx.requested_digest),
             concurrency=ctx.concurrency)
    return 0


def run_verify_index(ctx: Context) -> int:
    from ..storeops import verify_index
    a = ctx.args
    verify_index(ctx.read_index(a.index), a.file, concurrency=ctx.concurrency)
    return 0
