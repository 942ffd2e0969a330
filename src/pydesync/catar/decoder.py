"""Decode a catar stream into nodes, checking it as strictly as casync does.

The decoder reads a stream front to back (a file, or an index's chunks) and
yields a `Node` for every entry in archive order and a `DirectoryEnd` after
each directory's goodbye table. A regular file's payload is read through
`Node.payload()` before the next item is requested (or skipped if not).
Every malformation raises `ArchiveError` naming the offset: records out of
order, bad names (`/`, `.`, `..`, NUL), oversized records, inconsistent
feature flags, goodbye tables that do not match the directory, truncation,
trailing data.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import PydesyncError, shown_path
from . import format as F

READ_AHEAD = 1 << 20
MAX_NAME = 255
MAX_PATH = 4096
MAX_XATTR_VALUE = 65536
# Upper bounds of each metadata record (whole record, header included).
META_LIMITS = {
    F.USER: 16 + MAX_NAME + 1, F.GROUP: 16 + MAX_NAME + 1,
    F.XATTR: 16 + MAX_NAME + 1 + MAX_XATTR_VALUE,
    F.ACL_USER: 32 + MAX_NAME + 1, F.ACL_GROUP: 32 + MAX_NAME + 1, F.ACL_GROUP_OBJ: 24,
    F.ACL_DEFAULT: 48, F.ACL_DEFAULT_USER: 32 + MAX_NAME + 1, F.ACL_DEFAULT_GROUP: 32 + MAX_NAME + 1,
    F.SELINUX: 16 + MAX_PATH, F.FCAPS: 16 + MAX_PATH, F.QUOTA_PROJID: 24,
}
# Order in which metadata records must appear; repeatable ones may occur several times.
META_STAGE = {
    F.USER: 1, F.GROUP: 2, F.XATTR: 3, F.ACL_USER: 4, F.ACL_GROUP: 5, F.ACL_GROUP_OBJ: 6,
    F.ACL_DEFAULT: 7, F.ACL_DEFAULT_USER: 8, F.ACL_DEFAULT_GROUP: 9, F.SELINUX: 10, F.FCAPS: 11,
    F.QUOTA_PROJID: 12,
}
REPEATABLE = {F.XATTR, F.ACL_USER, F.ACL_GROUP, F.ACL_DEFAULT_USER, F.ACL_DEFAULT_GROUP}
META_FEATURE = {
    F.USER: F.WITH_USER_NAMES, F.GROUP: F.WITH_USER_NAMES, F.XATTR: F.WITH_XATTRS,
    F.ACL_USER: F.WITH_ACL, F.ACL_GROUP: F.WITH_ACL, F.ACL_GROUP_OBJ: F.WITH_ACL, F.ACL_DEFAULT: F.WITH_ACL,
    F.ACL_DEFAULT_USER: F.WITH_ACL, F.ACL_DEFAULT_GROUP: F.WITH_ACL, F.SELINUX: F.WITH_SELINUX,
    F.FCAPS: F.WITH_FCAPS, F.QUOTA_PROJID: F.WITH_QUOTA_PROJID,
}
_ENTRY_BODY = struct.Struct("<6Q")
_IFMT, _IFDIR, _IFREG = 0o170000, stat.S_IFDIR, stat.S_IFREG
KNOWN_TYPES = frozenset((stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                         stat.S_IFSOCK))


class ArchiveError(PydesyncError):
    """The archive is malformed."""


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


@dataclass
class AclEntry:
    id: int
    perm: int
    name: bytes | None = None


@dataclass(slots=True)
class Node:
    """One archive entry with its metadata (fields absent from the archive are None/empty).

    Slots and shared empty tuples keep the tens of thousands of nodes of an OS tree cheap. A node
    keeps its path only while that is shorter than PATH_MAX; deeper ones build it from their
    parents when asked, so a walk of any depth holds memory linear in the depth, not its square."""

    _path: bytes | None
    name: bytes
    offset: int
    feature_flags: int
    mode: int
    flags: int
    uid: int
    gid: int
    mtime: int
    user: bytes | None = None
    group: bytes | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    acl_users: tuple[AclEntry, ...] = ()
    acl_groups: tuple[AclEntry, ...] = ()
    acl_group_obj: int | None = None
    acl_default: tuple[int, int, int, int] | None = None
    acl_default_users: tuple[AclEntry, ...] = ()
    acl_default_groups: tuple[AclEntry, ...] = ()
    selinux: bytes | None = None
    fcaps: bytes | None = None
    quota_projid: int | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    size: int | None = None
    _decoder: ArchiveDecoder | None = field(default=None, repr=False, compare=False)
    parent: Node | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> bytes:
        """The path below the archive's root (b"" for the root itself)."""
        if self._path is not None:
            return self._path
        names = []
        node: Node | None = self
        while node is not None and node._path is None:
            names.append(node.name)
            node = node.parent
        if node is not None and node._path:
            names.append(node._path)
        return b"/".join(reversed(names))

    @property
    def is_dir(self) -> bool:
        return self.mode & _IFMT == _IFDIR

    @property
    def is_file(self) -> bool:
        return self.mode & _IFMT == _IFREG

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def payload(self, block: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes, in blocks; only valid before the decoder moves on."""
        if self._decoder is None or self.size is None:
            return iter(())
        return self._decoder._payload(self, block)

    def read_payload(self) -> bytes | memoryview:
        """The whole (remaining) payload at once, without copying it (a view that stays valid)."""
        if self._decoder is None or self.size is None:
            return b""
        return self._decoder._read_payload()


@dataclass
class DirectoryEnd:
    """Emitted after a directory's last child (its goodbye table was checked)."""

    node: Node


@dataclass
class _Frame:
    node: Node
    items: list[tuple[int, int, int]] = field(default_factory=list)
    last_name: bytes | None = None


class ArchiveDecoder:
    """Iterate over the nodes of a catar stream (see the module docstring)."""

    def __init__(self, stream: Readable, name: str = "archive"):
        self.stream = stream
        # read1 (one read of what a pipe has) keeps a streamed archive moving; read otherwise
        self._read_more = getattr(stream, "read1", stream.read)
        self.name = name
        self.offset = 0
        self.flags: int | None = None
        self._payload_left = 0
        self._buf = b""
        self._view = memoryview(self._buf)  # payload slices without a copy
        self._pos = 0

    # ---- low level ---------------------------------------------------------------------------
    def error(self, message: str, offset: int | None = None) -> ArchiveError:
        at = self.offset if offset is None else offset
        return ArchiveError(f"{self.name}: invalid archive at offset {at}: {message}")

    def _fill(self, n: int) -> bool:
        """Make at least n bytes available in the look-ahead buffer; False at end of stream."""
        have = len(self._buf) - self._pos
        if have >= n:
            return True
        parts = [self._buf[self._pos:]] if have else []
        while have < n:
            more = self._read_more(max(READ_AHEAD, n - have))
            if not more:
                break
            parts.append(more)
            have += len(more)
        self._buf = parts[0] if len(parts) == 1 else b"".join(parts)  # one part: no copy
        self._view, self._pos = memoryview(self._buf), 0
        return have >= n

    def _read(self, n: int, view: bool = False) -> bytes:
        """The next n bytes; with view, a memoryview into the read-ahead buffer (no copy)."""
        if len(self._buf) - self._pos < n and not self._fill(n):
            raise self.error(f"truncated (wanted {n} bytes, got {len(self._buf) - self._pos})")
        data = (self._view if view else self._buf)[self._pos:self._pos + n]
        self._pos += n
        self.offset += n
        return data  # type: ignore[return-value]  # (a view when asked for one: callers only read it)

    def _read_some(self, n: int) -> bytes:
        """Up to n bytes (at least one): what is buffered first, then straight from the stream."""
        if self._pos < len(self._buf):
            data = self._buf[self._pos:self._pos + n]
            self._pos += len(data)
        else:
            data = self._read_more(n)
            if not data:
                raise self.error("truncated payload")
        self.offset += len(data)
        return data

    def _at_end(self) -> bool:
        return self._pos >= len(self._buf) and not self.stream.read(1)

    def _header(self) -> tuple[int, int, int] | None:
        """(offset, size, type) of the next record, or None at a clean end of stream."""
        start = self.offset
        if len(self._buf) - self._pos < 16 and not self._fill(16):
            if self._pos >= len(self._buf):
                return None
            raise self.error("truncated record header")
        size, kind = F.HEADER.unpack_from(self._buf, self._pos)
        self._pos += 16
        self.offset += 16
        if size < 16:
            raise self.error(f"record size {size} below 16", start)
        return start, size, kind

    def _body(self, size: int, limit: int, what: str, start: int) -> bytes:
        if size > limit:
            raise self.error(f"{what} record of {size} bytes exceeds {limit}", start)
        return self._read(size - 16)

    @staticmethod
    def _cstring(body: bytes) -> bytes | None:
        """Body as a NUL-terminated string without inner NULs, or None if malformed."""
        if not body.endswith(b"\0") or b"\0" in body[:-1]:
            return None
        return body[:-1]

    def skip_by_seeking(self) -> None:
        """Skip the rest of the current payload; a seekable stream jumps over it unread (a mounted
        archive index then fetches no payload chunks while listing)."""
        left = self._payload_left
        buffered = len(self._buf) - self._pos
        seek = getattr(self.stream, "seek", None)
        if left <= buffered or seek is None:
            self._skip_payload()
            return
        self._pos = len(self._buf)
        seek(left - buffered, os.SEEK_CUR)
        self.offset += left
        self._payload_left = 0

    def _skip_payload(self) -> None:
        while self._payload_left:
            self._payload_left -= len(self._read_some(min(self._payload_left, 1 << 20)))

    def _read_payload(self) -> bytes | memoryview:
        """The rest of the payload; a view into the read-ahead buffer when it is all there."""
        n, self._payload_left = self._payload_left, 0
        return self._read(n, view=True)

    def _payload(self, node: Node, block: int) -> Iterator[bytes]:
        while self._payload_left:
            data = self._read_some(min(self._payload_left, block))
            self._payload_left -= len(data)
            yield data

    # ---- nodes -------------------------------------------------------------------------------
    def _entry(self, parent: Node | None, name: bytes,
               entry: tuple[int, int, int]) -> tuple[Node, tuple | None]:
        """ENTRY and its metadata records; returns the node and the next (non-metadata) header."""
        start, size, kind = entry
        if kind != F.ENTRY:
            raise self.error(f"expected ENTRY, found {F.RECORD_NAMES.get(kind, hex(kind))}", start)
        if size != F.ENTRY_SIZE:
            raise self.error(f"ENTRY of size {size}", start)
        flags, mode, eflags, uid, gid, mtime = _ENTRY_BODY.unpack(self._read(48))
        if flags != self.flags:
            self._check_flags(flags, start)
        if mode > 0o177777 or mode & _IFMT not in KNOWN_TYPES:  # (type bits | 0o7777 == 0o177777)
            raise self.error(f"bad mode {mode:o}", start)
        if uid >= 2**32 - 1 or gid >= 2**32 - 1:
            raise self.error("uid/gid out of range", start)
        if mtime >= 2**63:  # no filesystem time holds it (timespec is signed)
            raise self.error(f"mtime {mtime} out of range", start)
        node = Node(_child_path(parent, name), name, start, flags, mode, eflags, uid, gid, mtime,
                    _decoder=self, parent=parent)
        stage = 0
        while True:
            header = self._header()
            if header is None or header[2] not in META_STAGE:
                return node, header
            hstart, hsize, hkind = header
            what = F.RECORD_NAMES[hkind]
            new_stage = META_STAGE[hkind]
            if new_stage < stage or (new_stage == stage and hkind not in REPEATABLE):
                raise self.error(f"{what} record out of order", hstart)
            stage = new_stage
            if not flags & META_FEATURE[hkind]:
                raise self.error(f"{what} record but the archive's feature flags exclude it", hstart)
            body = self._body(hsize, META_LIMITS[hkind], what, hstart)
            self._meta(node, hkind, body, hstart)

    def _check_flags(self, flags: int, start: int) -> None:
        if self.flags is None:
            if flags & ~F.FEATURE_FLAGS_MAX:
                raise self.error(f"unsupported feature flags {flags:#x}", start)
            if F.normalize_flags(flags) != flags:
                raise self.error(f"feature flags {flags:#x} are not normalised", start)
            self.flags = flags
        elif flags != self.flags:
            raise self.error(f"feature flags {flags:#x} differ from the archive's {self.flags:#x}", start)

    def _meta(self, node: Node, kind: int, body: bytes, start: int) -> None:
        what = F.RECORD_NAMES[kind]
        if kind in (F.USER, F.GROUP, F.SELINUX):
            text = self._cstring(body)
            if not text:
                raise self.error(f"malformed {what} record", start)
            if kind == F.USER:
                node.user = text
            elif kind == F.GROUP:
                node.group = text
            else:
                node.selinux = text
        elif kind == F.XATTR:
            name, sep, value = body.partition(b"\0")
            if not sep or not name.startswith((b"user.", b"trusted.")) or len(name) > MAX_NAME:
                raise self.error("malformed XATTR record", start)
            if node.xattrs and name <= node.xattrs[-1][0]:
                raise self.error("XATTR records not in strictly increasing name order", start)
            node.xattrs += ((name, value),)
        elif kind in (F.ACL_USER, F.ACL_GROUP, F.ACL_DEFAULT_USER, F.ACL_DEFAULT_GROUP):
            if len(body) < 16:
                raise self.error(f"malformed {what} record", start)
            ident, perm = struct.unpack_from("<QQ", body)
            name = None
            if len(body) > 16:
                name = self._cstring(body[16:])
                if not name:
                    raise self.error(f"malformed {what} record", start)
            if perm & ~7 or ident >= 2**32 - 1:
                raise self.error(f"malformed {what} record", start)
            entry = (AclEntry(ident, perm, name),)
            if kind == F.ACL_USER:
                node.acl_users += entry
            elif kind == F.ACL_GROUP:
                node.acl_groups += entry
            elif kind == F.ACL_DEFAULT_USER:
                node.acl_default_users += entry
            else:
                node.acl_default_groups += entry
        elif kind == F.ACL_GROUP_OBJ:
            if len(body) != 8:
                raise self.error("malformed ACL_GROUP_OBJ record", start)
            node.acl_group_obj = struct.unpack("<Q", body)[0] & 7
        elif kind == F.ACL_DEFAULT:
            if len(body) != 32:
                raise self.error("malformed ACL_DEFAULT record", start)
            node.acl_default = struct.unpack("<4Q", body)
        elif kind == F.FCAPS:
            if not body:
                raise self.error("empty FCAPS record", start)
            node.fcaps = body
        elif kind == F.QUOTA_PROJID:
            if len(body) != 8:
                raise self.error("malformed QUOTA_PROJID record", start)
            node.quota_projid = struct.unpack("<Q", body)[0]

    def _content(self, node: Node, header: tuple[int, int, int] | None) -> tuple | None:
        """Read a non-directory node's content record; returns the next header (fifo/socket: unchanged)."""
        kind_bits = node.mode & _IFMT
        if kind_bits == _IFREG and header is not None and header[2] == F.PAYLOAD:  # the common case
            node.size = self._payload_left = header[1] - 16
            return None
        mode = node.mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return header
        if header is None:
            raise self.error("truncated: node content missing")
        start, size, kind = header
        if stat.S_ISREG(mode):
            if kind != F.PAYLOAD:
                raise self.error(f"regular file {shown_path(node.path)!r} without PAYLOAD", start)
            node.size = size - 16
            self._payload_left = node.size
        elif stat.S_ISLNK(mode):
            if kind != F.SYMLINK:
                raise self.error(f"symlink {shown_path(node.path)!r} without SYMLINK", start)
            target = self._cstring(self._body(size, 16 + MAX_PATH, "SYMLINK", start))
            if not target:
                raise self.error("malformed SYMLINK record", start)
            node.target = target
        else:  # device
            if kind != F.DEVICE or size != 32:
                raise self.error(f"device {shown_path(node.path)!r} without DEVICE", start)
            major, minor = struct.unpack("<QQ", self._read(16))
            if major >= 2**32 or minor >= 2**32:
                raise self.error("device number out of range", start)
            node.rdev = (major, minor)
        return None

    # ---- the walk ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node | DirectoryEnd]:
        header = self._header()
        if header is None:
            raise self.error("empty archive")
        node: Node | None
        node, header = self._entry(None, b"", header)
        stack: list[_Frame] = []
        child_start = 0
        while True:
            if node is not None:
                if node.is_dir:
                    yield node
                    stack.append(_Frame(node))
                else:
                    header = self._content(node, header)
                    yield node
                    self._skip_payload()
                    if not stack:
                        raise self.error("the archive's root is not a directory", node.offset)
                    stack[-1].items.append((child_start, self.offset if header is None else header[0],
                                            F.name_hash(node.name)))
                node = None
            if header is None:
                header = self._header()
                if header is None:
                    raise self.error("truncated: directory not terminated")
            start, size, kind = header
            frame = stack[-1]
            if kind == F.FILENAME:
                name = self._cstring(self._body(size, 16 + MAX_NAME + 1, "FILENAME", start))
                if not name or name in (b".", b"..") or b"/" in name:
                    raise self.error(f"invalid file name {name!r}", start)
                if frame.last_name is not None and name <= frame.last_name:
                    raise self.error(f"file name {name!r} out of order or duplicated", start)
                frame.last_name = name
                child_start = start
                entry = self._header()
                if entry is None:
                    raise self.error("truncated after FILENAME")
                node, header = self._entry(frame.node, name, entry)
            elif kind == F.GOODBYE:
                self._goodbye(frame, start, size)
                stack.pop()
                yield DirectoryEnd(frame.node)
                header = None
                if not stack:
                    if not self._at_end():
                        raise self.error("data after the end of the archive")
                    return
                stack[-1].items.append((frame_start(frame), self.offset, F.name_hash(frame.node.name)))
            else:
                raise self.error(f"unexpected {F.RECORD_NAMES.get(kind, hex(kind))} record in a directory",
                                 start)

    def _goodbye(self, frame: _Frame, start: int, size: int) -> None:
        count = len(frame.items)
        if size != 16 + 24 * count + 24:
            raise self.error(f"GOODBYE of {size} bytes for a directory of {count} entries", start)
        body = self._read(size - 16)
        found = [struct.unpack_from("<QQQ", body, 24 * i) for i in range(count)]
        tail = struct.unpack_from("<QQQ", body, 24 * count)
        if tail[2] != F.GOODBYE_TAIL_MARKER or tail[1] != size or tail[0] != start - frame.node.offset:
            raise self.error("GOODBYE tail does not match the directory", start)
        expected = sorted((start - s, e - s, h) for s, e, h in frame.items)
        if sorted(found) != expected:
            raise self.error("GOODBYE table does not match the directory's entries", start)


def _child_path(parent: Node | None, name: bytes) -> bytes | None:
    """A new node's path to keep: its parent's plus its name, while shorter than PATH_MAX (the
    root's is b""); None beyond, where `Node.path` builds it on demand."""
    if parent is None:
        return b""
    above = parent._path
    if above is None:
        return None
    if not above:
        return name
    return above + b"/" + name if len(above) + len(name) < MAX_PATH else None


def frame_start(frame: _Frame) -> int:
    """Offset of the FILENAME record that introduced a directory (its parent's last child)."""
    return frame.node.offset - (16 + len(frame.node.name) + 1)
