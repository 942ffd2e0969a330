"""Encode the tree a tar stream describes as a catar (`tar --input-format=tar`).

A tar stream lists entries in any order, a directory's children need not follow it, and the same
path may come twice; a catar is a depth-first walk with each directory's children in strcmp
order. So the headers are read into a tree first (later entries replace earlier ones, as tar
extraction does), and the file contents are spooled to an unnamed temporary file as they stream
by: memory holds the metadata only, whatever the size of the files. Then the tree is encoded
exactly as TreeEncoder encodes a directory on disk with the same metadata.

tarfile (the standard library's) reads the stream: USTAR, GNU (long names, sparse files) and PAX,
compressed with gzip, bzip2 or xz or not. PAX `SCHILY.xattr.*` and `LIBARCHIVE.xattr.*` records
become xattrs (and with them ACLs, SELinux labels and file capabilities, as on disk). A hard link
becomes a copy of the file it names (a catar has no hard links; casync copies them too). A path
that climbs out of the archive (`..`) is refused.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from ..errors import shown_path
from . import format as F
from .encoder import _ENTRY, CASYNC_MAX_DEPTH, XATTR_FEATURES, EncodeError, LazyPath, TreeEncoder

SPOOL_BLOCK = 1 << 20
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755  # a directory the stream implies but does not list


@dataclass
class TarNode:
    """One path of the tree: its metadata, and its children (directories) or contents (files)."""

    mode: int = DEFAULT_DIR_MODE
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    user: str = ""
    group: str = ""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # a symlink's
    rdev: tuple[int, int] = (0, 0)  # a device's major and minor
    data: tuple[int, int] = (0, 0)  # a file's offset and size in the spool
    children: dict[bytes, TarNode] = field(default_factory=dict)
    listed: bool = False  # the stream had an entry for it (not only implied by a child's path)


class TarInputEncoder(TreeEncoder):
    """Iterate over the catar bytes of the tree in the tar stream `source` (a path or a binary
    file object). `add_root` makes a root directory (mode 0755) when the stream lists none,
    as desync's `--tar-add-root`; without it such a stream is refused."""

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, flags: int, add_root: bool = False,
                 warn: Callable[[str], None] | None = None):
        super().__init__(b"<tar>", flags, warn)
        self.source = source
        self.name = os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else "<stdin>"
        self.add_root = add_root
        self._spool: BinaryIO | None = None

    def __iter__(self) -> Iterator[bytes]:
        with tempfile.TemporaryFile(buffering=0) as spool:  # read back with pread: no buffer
            self._spool = spool
            root = self._read_tree(spool)
            yield from self._tar_directory(root)
            yield from self._flush(force=True)

    # ---- reading the stream ------------------------------------------------------------------
    def _read_tree(self, spool: BinaryIO) -> TarNode:
        root = TarNode()
        try:
            if isinstance(self.source, (str, os.PathLike)):
                archive = tarfile.open(os.fspath(self.source), mode="r|*", tarinfo=_MarkedEnd)  # noqa: SIM115
            else:
                archive = tarfile.open(fileobj=self.source, mode="r|*", tarinfo=_MarkedEnd)  # noqa: SIM115
        except FileNotFoundError:
            raise EncodeError(f"{self.name}: no such file") from None
        except OSError as e:
            raise EncodeError(f"cannot read {self.name}: {e.strerror or e}") from None
        except tarfile.TarError as e:
            raise EncodeError(f"{self.name}: not a tar stream ({e})") from None
        with archive:
            try:
                for member in archive:
                    self._add(root, member, archive, spool)
            except tarfile.TarError as e:
                raise EncodeError(f"{self.name}: damaged tar stream ({e})") from None
            except (OSError, EOFError) as e:
                raise EncodeError(f"cannot read {self.name}: {getattr(e, 'strerror', None) or e}") from None
            if not getattr(archive, _ENDED, False):
                raise EncodeError(f"{self.name}: the tar stream ends without its end-of-archive blocks "
                                  "(truncated?)")
        if not root.listed and not self.add_root:
            raise EncodeError(f"{self.name}: the tar stream has no root directory entry ('./'); "
                              "--tar-add-root makes one")
        return root

    def _add(self, root: TarNode, member: tarfile.TarInfo, archive: tarfile.TarFile, spool: BinaryIO) -> None:
        parts = _components(member.name, self.name)
        parent = root
        for part in parts[:-1]:
            child = parent.children.get(part)
            if child is None or not stat.S_ISDIR(child.mode):
                child = parent.children[part] = TarNode()
            parent = child
        if member.islnk():
            original = self._find(root, _components(member.linkname, self.name))
            if original is None or not stat.S_ISREG(original.mode):
                raise EncodeError(f"{self.name}: {member.name}: hard link to {member.linkname}, "
                                  "which is not a file earlier in the stream")
            node = dataclasses.replace(original)  # the same inode: its metadata and xattrs too
        elif member.isfile():
            node = self._node(member, stat.S_IFREG)
            node.data = self._spool_contents(archive, member, spool)
        elif member.isdir():
            node = self._node(member, stat.S_IFDIR)
            old = root if not parts else parent.children.get(parts[-1])
            if old is not None and stat.S_ISDIR(old.mode):
                node.children = old.children  # listed after (or again after) some of its children
        elif member.issym():
            node = self._node(member, stat.S_IFLNK)
            node.target = os.fsencode(member.linkname)
        elif member.ischr() or member.isblk():
            node = self._node(member, stat.S_IFCHR if member.ischr() else stat.S_IFBLK)
            node.rdev = (member.devmajor, member.devminor)
        elif member.isfifo():
            node = self._node(member, stat.S_IFIFO)
        else:
            return  # GNU volume labels, multi-volume continuations: not part of the tree
        if not parts:
            if not stat.S_ISDIR(node.mode):
                raise EncodeError(f"{self.name}: the root entry {member.name!r} is not a directory")
            root.__dict__.update(node.__dict__)
        else:
            parent.children[parts[-1]] = node

    @staticmethod
    def _find(root: TarNode, parts: list[bytes]) -> TarNode | None:
        node: TarNode | None = root
        for part in parts:
            node = node.children.get(part) if node is not None else None
        return node

    def _node(self, member: tarfile.TarInfo, kind: int) -> TarNode:
        return TarNode(mode=kind | (member.mode & 0o7777), uid=member.uid, gid=member.gid,
                       mtime_ns=_mtime_ns(member), user=member.uname, group=member.gname,
                       xattrs=_xattrs(member), listed=True)

    def _spool_contents(self, archive: tarfile.TarFile, member: tarfile.TarInfo,
                        spool: BinaryIO) -> tuple[int, int]:
        offset = spool.seek(0, os.SEEK_END)
        contents = archive.extractfile(member)
        assert contents is not None  # a regular file has contents
        size = 0
        while block := contents.read(SPOOL_BLOCK):
            try:
                spool.write(block)
            except OSError as e:
                raise EncodeError(f"cannot spool {member.name} to a temporary file: {e.strerror}") from None
            size += len(block)
        return offset, size

    # ---- encoding the tree -------------------------------------------------------------------
    def _tar_directory(self, root: TarNode) -> Iterator[bytes]:
        """The tree below `root`, depth first with each directory's children in strcmp order; a
        stack of its own (any depth, no Python recursion; paths made only for messages)."""
        self._out(self._tar_metadata(b".", root))
        # per directory: its name, entry offset, FILENAME offset, children to come, goodbye items
        stack: list[tuple[bytes, int, int, Iterator[tuple[bytes, TarNode]], list[tuple[int, int, int]]]] = [
            (b".", 0, 0, iter(sorted(root.children.items())), [])]
        while stack:
            dir_name, entry_offset, start, children, items = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                self._out(F.goodbye_record(items, self.offset, entry_offset))
                if stack:
                    stack[-1][4].append((start, self.offset, F.name_hash(dir_name)))
                yield from self._flush()
                continue
            name, node = child
            if not self._type_enabled(node.mode):
                continue
            child_start = self.offset
            self._out(F.cstring(F.FILENAME, name))
            def path_of(name: bytes = name) -> bytes:  # (the stack as it is when a message needs it)
                return b"/".join([*(level[0] for level in stack), name])

            where = LazyPath(path_of)
            if len(stack) >= CASYNC_MAX_DEPTH:
                self._too_deep_for_casync(where)
            if stat.S_ISDIR(node.mode):
                entry = self.offset
                self._out(self._tar_metadata(where, node))
                stack.append((name, entry, child_start, iter(sorted(node.children.items())), []))
                continue
            if stat.S_ISREG(node.mode):
                self._out(self._tar_metadata(where, node, payload_size=node.data[1]))
                yield from self._payload(where, node.data[1], self._spool_reader(*node.data))
            else:
                self._out(self._tar_metadata(where, node))
            items.append((child_start, self.offset, F.name_hash(name)))
            yield from self._flush()

    def _spool_reader(self, offset: int, size: int):
        fd = self._spool.fileno()  # type: ignore[union-attr]  # (spooled before any reader is made)
        position = offset

        def read(n: int) -> bytes:
            nonlocal position
            block = os.pread(fd, n, position)
            position += len(block)
            return block
        return read

    def _tar_metadata(self, path: bytes | os.PathLike[bytes], node: TarNode, payload_size: int = 0) -> bytes:
        """ENTRY, the metadata records and the content header of a node, as TreeEncoder._metadata
        makes them from a file on disk with the same metadata."""
        flags = self.flags
        mode = node.mode
        uid, gid = (node.uid, node.gid) if self.has_ids else (0, 0)
        if flags & F.WITH_16BIT_UIDS and (uid > 0xFFFF or gid > 0xFFFF):
            raise EncodeError(f"{shown_path(path)}: uid/gid does not fit 16 bits")
        out = [_ENTRY.pack(F.ENTRY_SIZE, F.ENTRY, flags, self._fixup_mode(mode), 0, uid, gid,
                           self._fixup_mtime(node.mtime_ns))]
        if flags & F.WITH_USER_NAMES:
            out.extend(self._owner_records(node.uid, node.gid, lambda _: node.user or None,
                                           lambda _: node.group or None))
        if flags & XATTR_FEATURES and node.xattrs:
            out.extend(self._xattr_borne_records(path, mode, set(node.xattrs),
                                                 lambda name: node.xattrs.get(os.fsencode(name))))
        if stat.S_ISREG(mode):
            out.append(F.HEADER.pack(16 + payload_size, F.PAYLOAD))
        elif stat.S_ISLNK(mode):
            out.append(F.cstring(F.SYMLINK, node.target))
        elif stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
            out.append(F.record(F.DEVICE, struct.pack("<QQ", *node.rdev)))
        return b"".join(out)


_ENDED = "_pydesync_end_seen"


class _MarkedEnd(tarfile.TarInfo):
    """Marks its TarFile when the end-of-archive block (512 zero bytes) is read: tarfile ends the
    same way at a bare end of data, which a stream cut short at a member's boundary looks like."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]  # (a classmethod in tarfile; its stubs say otherwise)
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # (in tarfile, not in its stubs)
            setattr(tarfile_, _ENDED, True)
            raise


def _components(name: str, source: str) -> list[bytes]:
    """A member's path as components below the root ('./a/b/', '/a/b' and 'a/b' alike)."""
    parts = [p for p in os.fsencode(name).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise EncodeError(f"{source}: {name}: a path outside the archive")
    return parts


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The modification time in nanoseconds, exact from a PAX record (tarfile's float is not)."""
    exact = member.pax_headers.get("mtime")
    if exact is not None:
        try:
            return int(Decimal(exact).scaleb(9).to_integral_value(rounding="ROUND_FLOOR"))
        except (InvalidOperation, ValueError):
            pass
    return int(member.mtime) * 1_000_000_000


def _xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    """Extended attributes from PAX records: GNU tar's and star's SCHILY.xattr.NAME (the raw
    value), libarchive's LIBARCHIVE.xattr.NAME (URL-encoded name, base64 value)."""
    out: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[os.fsencode(key[13:])] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                out[unquote_to_bytes(key[17:])] = base64.b64decode(value, validate=False)
            except ValueError:
                continue
    return out


__all__ = ["TarInputEncoder"]
