"""BSD mtree manifests of archives and trees (desync's `mtree` command's output).

`mtree_lines` turns the items of an `ArchiveDecoder` into manifest lines, one
per entry in archive order. The decoder can read a .catar file, the stream an
index describes (chunks from a store), or a directory encoded on the fly with
`TreeEncoder` — so all three give the same manifest for the same tree.

Lines carry desync's keywords, without its quirks: nanoseconds are always
zero-padded, `mode` keeps the setuid/setgid/sticky bits, the SHA-256 keyword
is spelled `sha256digest`, and fifos/sockets get a line (`type=fifo`,
`type=socket`) instead of being dropped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator

from .blobreader import BlobReader
from .catar.decoder import ArchiveDecoder, DirectoryEnd, Node, Readable
from .catar.encoder import TreeEncoder
from .digest import SHA256, SHA512_256, check_digest, hasher
from .index import Index
from .parallel import DEFAULT_CONCURRENCY
from .store.base import Store
from .streams import IterReader

HEADER = "#mtree v1.0"
DIGEST_KEYWORD = {SHA512_256: "sha512256digest", SHA256: "sha256digest"}

# Bytes written verbatim in names: printable ASCII except space, '#' and backslash.
_ESCAPES = [chr(b) if 32 < b < 127 and b not in (0x23, 0x5C) else f"\\{b:03o}" for b in range(256)]


def escape(name: bytes) -> str:
    """mtree(5) name encoding: `\\`, `#`, space and bytes outside printable ASCII as `\\ooo`."""
    return "".join(_ESCAPES[b] for b in name)


_TYPES = ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "link"), (stat.S_ISCHR, "char"),
          (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"))


def _type(mode: int) -> str:
    """mtree's type keyword for a mode."""
    return next((name for is_type, name in _TYPES if is_type(mode)), "socket")


def node_line(node: Node, digest: str = SHA512_256, shown: str | None = None) -> str:
    """The manifest line of one node; reads a regular file's payload (hashing it). `shown` is its
    escaped path, if the caller has it already."""
    kind = _type(node.mode)
    if shown is None:
        shown = escape(node.path) if node.path else "."
    parts = [shown, f"type={kind}", f"mode={node.mode & 0o7777:04o}"]
    if kind == "link":
        parts.append(f"target={escape(node.target or b'')}")
    parts += [f"uid={node.uid}", f"gid={node.gid}"]
    if kind == "file":
        parts.append(f"size={node.size or 0}")
    sec, nsec = divmod(node.mtime, 1_000_000_000)
    parts.append(f"time={sec}.{nsec:09d}")
    if kind == "file":
        h = hasher(digest)()
        for block in node.payload():
            h.update(block)
        parts.append(f"{DIGEST_KEYWORD[digest]}={h.hexdigest()}")
    return " ".join(parts)


def mtree_lines(items: Iterable[Node | DirectoryEnd], digest: str = SHA512_256) -> Iterator[str]:
    """`#mtree v1.0`, then one line per node (without newlines)."""
    check_digest(digest)
    yield HEADER
    folder = ""  # escaped path of the directory being listed, grown and cut as the walk goes:
    cuts: list[int] = []  # memory linear in the depth, whatever it is
    for item in items:
        if isinstance(item, DirectoryEnd):
            folder = folder[:cuts.pop()]
            continue
        shown = f"{folder}/{escape(item.name)}" if folder else escape(item.name) if cuts else "."
        yield node_line(item, digest, shown)
        if item.is_dir:
            cuts.append(len(folder))
            folder = shown if cuts[1:] else ""


# ---- decoder items from each kind of input ------------------------------------------------------
def stream_items(stream: Readable, name: str = "archive") -> ArchiveDecoder:
    """Items of a catar read from `stream`."""
    return ArchiveDecoder(stream, name)


def catar_items(path: str | os.PathLike[str]) -> Iterator[Node | DirectoryEnd]:
    """Items of a .catar file."""
    with open(path, "rb") as f:
        yield from ArchiveDecoder(f, os.fspath(path))


def index_items(index: Index, store: Store, concurrency: int = DEFAULT_CONCURRENCY,
                name: str = "index") -> ArchiveDecoder:
    """Items of the catar an index (.caidx) describes, its chunks read from `store`."""
    return ArchiveDecoder(IterReader(BlobReader(index, store, concurrency).iter_range()), name)


def tree_items(root: str | os.PathLike[str], flags: int) -> ArchiveDecoder:
    """Items of the directory `root` as casync would archive it with `flags`."""
    return ArchiveDecoder(IterReader(TreeEncoder(root, flags)), os.fspath(root))


__all__ = ["DIGEST_KEYWORD", "HEADER", "catar_items", "escape", "index_items", "mtree_lines", "node_line",
           "stream_items", "tree_items"]
