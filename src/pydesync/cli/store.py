"""Store commands: cache, prune, verify."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .common import Context, add_bool, add_concurrency, add_ignore, add_store_options, add_stores
from .ignore import ignored_ids
from .progress import Progress


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cache", parents=[parent], help="copy the chunks of indexes into a cache store",
                       description="Copy every chunk INDEX... references from the -s stores into the "
                                   "-c store, skipping chunks it already has.")
    p.add_argument("index", nargs="+")
    add_stores(p)
    add_ignore(p)
    add_store_options(p)
    p.set_defaults(func=run_cache)

    p = sub.add_parser("prune", parents=[parent], help="delete chunks no index references",
                       description="Delete every chunk in the -s store that none of INDEX... uses.")
    p.add_argument("index", nargs="+")
    add_stores(p, help="store to prune", cache=False)
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_store_options(p)
    p.set_defaults(func=run_prune)

    p = sub.add_parser("verify", parents=[parent], help="check every chunk in a local, sftp or s3 store",
                       description="Read, decompress and hash every chunk in the -s store; report "
                                   "invalid ones on stderr (and delete them with -r).")
    add_stores(p, help="local, sftp or s3 store to verify", cache=False)
    add_concurrency(p)
    add_bool(p, "-r", "--repair", default=False, help="remove invalid chunks from the store")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("upgrade-s3", parents=[parent], help="move an s3 store's chunks to the current layout",
                       description="Convert an S3 store from the old flat layout (<prefix><id>.cacnk) to "
                                   "<prefix><4 hex>/<id>.cacnk: each chunk is copied, then its old key "
                                   "deleted, so an interrupted run can simply be repeated.")
    add_stores(p, help="s3 store to upgrade", cache=False)
    add_store_options(p)
    p.set_defaults(func=run_upgrade_s3)


def run_cache(ctx: Context) -> int:
    from ..storeops import copy_chunks
    a = ctx.args
    if not a.cache:
        raise UsageError("no target cache store provided")
    if not a.store:
        raise UsageError("no source store provided")
    ignore = ignored_ids(a.ignore, a.ignore_chunks, ctx.requested_digest)
    ids = [c.id for loc in a.index for c in ctx.read_index(loc) if c.id not in ignore]
    target = ctx.target(a.cache, create=True)
    source = ctx.source(cache=False)  # the -c store is the target here, not part of the chain
    assert source is not None
    with source, target, Progress("", len(set(ids)), label="Caching") as bar:
        copy_chunks(ids, source, target, concurrency=ctx.concurrency, progress=bar.callback())
    return 0


def _confirm(count: int, location: str) -> bool:
    print(f"Warning: The provided index files reference {count} unique chunks. Are you sure\n"
          f"you want to delete all other chunks from '{location}'?")
    while True:
        sys.stdout.write("[y/N]: ")
        sys.stdout.flush()
        answer = sys.stdin.readline()
        if not answer:
            raise UsageError("no confirmation given (use -y to prune without asking)")
        word = answer.strip().lower()
        if word in ("y", "yes"):
            return True
        if word in ("", "n", "no"):
            return False


def run_prune(ctx: Context) -> int:
    from ..storeops import prune, referenced_ids
    a = ctx.args
    if len(a.store) != 1:
        raise UsageError("prune needs exactly one store (-s)")
    store = ctx.target(a.store[0])
    with store:
        keep = referenced_ids(ctx.read_index(loc) for loc in a.index)
        if not a.yes and not _confirm(len(keep), a.store[0]):
            return 0
        with Progress("Pruning ", None, unit="chunks deleted") as bar:
            prune(store, keep, ctx.concurrency, progress=bar.callback())
    return 0


def run_upgrade_s3(ctx: Context) -> int:
    from ..store.s3 import upgrade_flat_layout
    a = ctx.args
    if len(a.store) != 1:
        raise UsageError("upgrade-s3 needs exactly one store (-s)")
    store = ctx.open(a.store[0])
    with store:
        moved = upgrade_flat_layout(store)
    print(f"moved {moved} chunks to the <4 hex>/<id> layout", file=sys.stderr)
    return 0


def run_verify(ctx: Context) -> int:
    from ..storeops import verify_store
    a = ctx.args
    if len(a.store) != 1:
        raise UsageError("verify needs exactly one local store (-s)")
    store = ctx.open(a.store[0])
    with store:
        if not store.listable:
            raise UsageError(f"verify needs a store that can list its chunks (local, sftp, s3, oci), "
                             f"not {a.store[0]}")

        def report(chunk_id: object, message: str, removed: bool) -> None:
            print(message + (": removed" if removed else ""), file=sys.stderr)

        with Progress("Verifying ", None, unit="chunks") as bar:
            verify_store(store, repair=a.repair, concurrency=ctx.concurrency, on_invalid=report,
                         progress=bar.callback())
    return 0
