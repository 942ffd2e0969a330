"""mount-index: a blob index as one read-only file, an archive index or archive as a tree."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..index import Index
from ..store.base import Store
from .blob import seeds_from_flags as _seeds
from .common import Context, add_seeds, add_store_options, add_stores

if TYPE_CHECKING:
    from ..mount import ChunkReader


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("mount-index", parents=[parent], help="mount an index read-only (FUSE)",
                       description="Mount INDEX at MOUNTPOINT until Ctrl-C or SIGTERM. A blob index "
                                   "(.caibx) shows one read-only file named after it (without the "
                                   "extension); an archive index (.caidx) or archive (.catar) shows its "
                                   "tree. Chunks are fetched from the -s stores as they are read.")
    p.add_argument("index")
    p.add_argument("mountpoint")
    add_stores(p)
    add_seeds(p)
    p.add_argument("--cor-file", help="copy-on-read: keep fetched chunks in this sparse file")
    p.add_argument("--cor-state-save", help="save which chunks the cor file holds here on exit")
    p.add_argument("--cor-state-init", help="prefetch the chunks this state file lists, in the background")
    p.add_argument("--cor-init-n", type=int, default=10, help="prefetch workers (default 10)")
    add_store_options(p)
    p.set_defaults(func=run_mount_index)


def _warn(message: str) -> None:
    print(f"mount-index: {message}", file=sys.stderr)


def run_mount_index(ctx: Context) -> int:
    from ..mount import SeekableStream, load_fuse, make_operations, mount, scan_tree
    a = ctx.args
    fuse = load_fuse()  # a missing FUSE is one clear line, before anything is opened
    if not os.path.isdir(a.mountpoint):
        raise UsageError(f"mount point {a.mountpoint} is not a directory")
    name = os.path.basename(a.index.rstrip("/"))
    if a.index.endswith(".catar"):
        with open(a.index, "rb") as f:
            fd = f.fileno()

            def read_at(offset: int, size: int) -> bytes:
                return os.pread(fd, size, offset)

            root = scan_tree(SeekableStream(read_at, os.fstat(fd).st_size), a.index)
            mount(make_operations(fuse, tree=(root, read_at), on_error=_warn), fuse, a.mountpoint, name)
        return 0
    index = ctx.read_index(a.index)
    store = ctx.source()
    if store is None:
        raise UsageError("no store provided (-s)")
    with store, _reader(ctx, index, store) as reader:
        if a.index.endswith(".caidx"):
            root = scan_tree(SeekableStream(reader.read, index.length), a.index)
            operations = make_operations(fuse, tree=(root, reader.read), on_error=_warn)
        else:
            operations = make_operations(fuse, blob=(name.rsplit(".", 1)[0] if "." in name else name, reader),
                                         on_error=_warn)
        mount(operations, fuse, a.mountpoint, name)
    return 0


@contextlib.contextmanager
def _reader(ctx: Context, index: Index, store: Store) -> Iterator[ChunkReader]:
    """The chunk reader, with seeds, the copy-on-read file and its state as the flags ask."""
    from ..mount import ChunkReader
    a = ctx.args
    if (a.cor_state_save or a.cor_state_init) and not a.cor_file:
        raise UsageError("--cor-state-save and --cor-state-init need --cor-file")
    seeds = _seeds(ctx, a.seed, a.seed_dir, a.index)
    for seed in seeds:
        seed.open()
    reader = ChunkReader(index, store, a.cor_file, on_error=_warn, seeds=seeds)
    try:
        if a.cor_state_save and os.path.exists(a.cor_state_save):
            reader.load_state(a.cor_state_save)
        if a.cor_state_init:
            reader.prefetch(a.cor_state_init, max(1, a.cor_init_n))
        yield reader
    finally:
        if a.cor_state_save:
            reader.save_state(a.cor_state_save)
        reader.close()
        for seed in seeds:
            seed.close()
