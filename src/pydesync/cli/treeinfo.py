"""Tree inspection commands: mtree and digest."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..digest import check_digest
from ..errors import PydesyncError, UsageError
from ..index import CA_FORMAT_INDEX
from ..store import Store
from .archive import add_feature_flags, feature_flags
from .common import Context, add_bool, add_store_options, add_stores

if TYPE_CHECKING:
    from ..catar.decoder import DirectoryEnd, Node

WHATS = ("archive", "archive-index", "blob", "blob-index", "directory")
SUFFIXES = {".catar": "archive", ".caidx": "archive-index", ".caibx": "blob-index"}


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """mtree and digest are registered here."""
    p = sub.add_parser("mtree", parents=[parent], help="print a catar, caidx or directory in mtree format",
                       description="Print the entries of a catar archive, of the archive a caidx "
                                   "describes (-i, chunks from -s) or of a local directory as a BSD "
                                   "mtree manifest on stdout. A directory is encoded as casync would "
                                   "archive it (casync's default features, or --with/--without), so "
                                   "all three inputs give the same manifest for the same tree.")
    p.add_argument("input", help="catar file, caidx (with -i) or directory")
    add_stores(p, help="source store(s), used with -i")
    p.add_argument("-i", "--index", action="store_true", help="read an index file (caidx), not a catar")
    add_feature_flags(p)
    add_store_options(p)
    p.set_defaults(func=run_mtree, no_time=False, one_file_system=False)

    p = sub.add_parser("digest", parents=[parent], help="print casync's digest of a tree, archive or blob",
                       description="Print what `casync digest` prints: for a directory the digest of "
                                   "its catar stream (casync's default features, or --with/--without; "
                                   "--digest picks the hash), for a .catar or the archive a .caidx "
                                   "describes the digest of the archive (its own digest flag picks the "
                                   "hash), for a blob file or the blob a .caibx describes the digest "
                                   "of its bytes. Index chunks come from -s (default: default.castr "
                                   "next to the index, as casync).")
    p.add_argument("input", nargs="?", default=".",
                   help="directory, .catar, .caidx, .caibx or blob file ('-' = blob on stdin; default .)")
    add_stores(p, help="store(s) holding the index's chunks")
    p.add_argument("--what", choices=WHATS, default=None,
                   help="what the input is (default: from its suffix, else directory or blob)")
    add_feature_flags(p)
    add_bool(p, "--exclude-submounts", default=False, help="(directory) skip other file systems' mounts")
    add_store_options(p)
    p.set_defaults(func=run_digest, no_time=False)


def _no_features(ctx: Context, what: str) -> None:
    if ctx.args.with_ or ctx.args.without:
        raise UsageError(f"--with/--without only apply to a directory, not to {what}")


def _write_lines(lines: Iterable[str]) -> None:
    out = sys.stdout
    for line in lines:
        out.write(line)
        out.write("\n")
    out.flush()


def _is_index(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) == 16 and int.from_bytes(head[8:], "little") == CA_FORMAT_INDEX


def run_mtree(ctx: Context) -> int:
    from ..mtree import catar_items, index_items, mtree_lines, stream_items, tree_items
    a = ctx.args
    digest = check_digest(ctx.digest)
    if a.index and not a.store:
        raise UsageError("-i requires at least one store (-s <location>)")
    items: Iterator[Node | DirectoryEnd] | Iterable[Node | DirectoryEnd]
    if a.input != "-" and not a.index:
        try:
            st = os.stat(a.input)
        except FileNotFoundError:
            raise PydesyncError(f"{a.input} does not exist") from None
        if stat.S_ISDIR(st.st_mode):
            _write_lines(mtree_lines(tree_items(a.input, feature_flags(ctx)), digest))
            return 0
        if _is_index(a.input):
            raise UsageError(f"{a.input} is an index: read it with -i and -s <store>")
    elif a.index and a.input != "-" and os.path.isdir(a.input):
        raise UsageError("-i can't be used with input directory")
    _no_features(ctx, "an archive")
    if not a.index:
        items = stream_items(sys.stdin.buffer, "<stdin>") if a.input == "-" else catar_items(a.input)
        _write_lines(mtree_lines(items, digest))
        return 0
    index = ctx.read_index(a.input)
    store = ctx.source()
    with store:
        _write_lines(mtree_lines(index_items(index, store, ctx.concurrency, a.input), digest))
    return 0


def _what(a: argparse.Namespace) -> str:
    """casync's choice of operation: --what, else the suffix, else what the input is."""
    if a.input == "-":
        return a.what or "blob"
    what = a.what or next((w for s, w in SUFFIXES.items() if a.input.endswith(s)), None)
    try:
        st = os.stat(a.input)
    except FileNotFoundError:
        raise PydesyncError(f"{a.input} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        if what not in (None, "directory"):
            raise UsageError(f"{a.input} is a directory, not a {what}")
        return "directory"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{a.input} is neither a directory, a regular file nor a block device")
    if what == "directory":
        raise UsageError(f"{a.input} is not a directory")
    return what or "blob"


def _index_store(ctx: Context) -> Store:
    """The -s stores, or casync's default: default.castr next to the index."""
    a = ctx.args
    if not a.store:
        if a.input == "-":
            raise UsageError("no store provided (-s)")
        default = os.path.join(os.path.dirname(a.input), "default.castr")
        if not os.path.isdir(default):
            raise UsageError(f"no store provided (-s) and no {default}")
        a.store = [default]
    store = ctx.source()
    return store


def run_digest(ctx: Context) -> int:
    from ..treedigest import (
        blob_digest,
        caibx_digest,
        caidx_digest,
        catar_digest,
        directory_digest,
        file_pieces,
    )
    a = ctx.args
    a.one_file_system = a.exclude_submounts
    digest = check_digest(ctx.digest)
    what = _what(a)
    if what == "directory":
        print(directory_digest(a.input, feature_flags(ctx)))
        return 0
    _no_features(ctx, f"a {what}")
    if what in ("archive-index", "blob-index"):
        index = ctx.read_index(a.input, check_digest=False)
        store = _index_store(ctx)
        with store:
            if what == "archive-index":
                result = caidx_digest(index, store, ctx.concurrency, a.input)
            else:
                result = caibx_digest(index, store, digest, ctx.concurrency)
    elif what == "archive":
        result = catar_digest("/dev/stdin" if a.input == "-" else a.input)
    else:
        pieces = iter(lambda: sys.stdin.buffer.read(1 << 20), b"") if a.input == "-" else file_pieces(a.input)
        result = blob_digest(pieces, digest)
    print(result)
    return 0
