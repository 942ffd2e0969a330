"""Encode a directory tree as a catar stream, byte-identical to `casync make` for the same tree
and feature flags.

The stream is produced as an iterator of byte strings (records and payload
blocks), so it can be written to a file, hashed or chunked without ever being
held in memory. Directory entries are visited in strcmp order of their raw
names; every node's metadata records follow its ENTRY in casync's order; each
directory ends with a GOODBYE table of its children.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import PydesyncError, shown_path
from ..fsutil import OPEN_DIRECTORIES, TreeMoved, reopen_parent
from ..platform import (
    EXT4_SUPER_MAGIC,
    FUSE_SUPER_MAGIC,
    VIRTUAL_FS_MAGICS,
    XFS_SUPER_MAGIC,
    btrfs_subvolume,
    fs_magic,
    get_xattr,
    list_xattrs,
    read_chattr,
    read_projid,
)
from . import exclude
from . import format as F
from .fsmeta import ACL_XATTR_ACCESS, ACL_XATTR_DEFAULT, PosixAcl, group_name, user_name

READ_BLOCK = 1024 * 1024
FLUSH_AT = 256 * 1024  # yield the stream in blocks at least this big (few generator hops)
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_ENTRY = struct.Struct("<QQ6Q")
XATTR_FEATURES = F.WITH_XATTRS | F.WITH_ACL | F.WITH_SELINUX | F.WITH_FCAPS
ACL_ACCESS = ACL_XATTR_ACCESS.encode()
ACL_DEFAULT = ACL_XATTR_DEFAULT.encode()
ACL_NAMES = {ACL_ACCESS, ACL_DEFAULT}


CASYNC_MAX_DEPTH = 64  # casync holds 64 nodes (the root included): an entry this deep it cannot read
_PROC_FD = b"/proc/self/fd/"


@functools.cache
def _proc_fd_usable() -> bool:
    return os.path.isdir(_PROC_FD)


@dataclass(slots=True, eq=False)
class _Level:
    """A directory being walked: its descriptor (None while closed for depth), children still to
    come, and the goodbye items of those done."""

    name: bytes
    fd: int | None
    st: os.stat_result
    magic: int
    rules: list[exclude.Rule]
    start: int  # where its FILENAME began in the parent (its goodbye item)
    entry_offset: int
    names: list[bytes] = field(default_factory=list)
    next: int = 0
    items: list[tuple[int, int, int]] = field(default_factory=list)


class LazyPath:
    """A node's path for messages, made by `make` only if one is needed (os.fsdecode takes it):
    walks at any depth keep names, not a path per level."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], bytes]):
        self._make = make

    def __fspath__(self) -> bytes:
        return self._make()


class EncodeError(PydesyncError):
    """A file of the tree cannot be read or cannot be represented with the chosen features."""


def _valid_xattr_name(name: bytes) -> bool:
    dot = name.find(b".")
    return 0 < dot < len(name) - 1 and len(name) <= 255


class TreeEncoder:
    """Iterate over the catar bytes of the tree at `root`.

    `offset` is the number of bytes produced so far; `flags` the archive's
    (normalised) feature flags, stored in every ENTRY.
    """

    def __init__(self, root: str | bytes | os.PathLike[str], flags: int,
                 warn: Callable[[str], None] | None = None):
        self.root = os.fsencode(root)
        self.warn = warn  # told (once) of what casync will not read back
        self._deep_warned = False
        self.flags = F.normalize_flags(flags)
        if self.flags & ~F.FEATURE_FLAGS_MAX:
            raise EncodeError(f"unsupported feature flags {self.flags:#x}")
        self.granularity = F.time_granularity(self.flags)
        self.offset = 0
        self.has_ids = bool(self.flags & (F.WITH_16BIT_UIDS | F.WITH_32BIT_UIDS))
        self._buf = bytearray()

    def _out(self, data: bytes) -> None:
        """Queue bytes of the stream; they are handed out in blocks of FLUSH_AT or more."""
        self.offset += len(data)
        self._buf += data

    def _flush(self, force: bool = False) -> Iterator[bytes]:
        if len(self._buf) >= FLUSH_AT or (force and self._buf):
            block, self._buf = bytes(self._buf), bytearray()
            yield block

    # ---- entry point -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[bytes]:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise EncodeError(f"cannot read {shown_path(self.root)}: {e.strerror}") from None
        self._levels: list[_Level] = []
        try:
            try:
                st = os.fstat(fd)
                magic = fs_magic(fd)
            except OSError as e:
                os.close(fd)
                raise EncodeError(f"cannot read {shown_path(self.root)}: {e.strerror}") from None
            self._enter(b"", fd, st, [], magic, 0)
            levels = self._levels
            while levels:  # a walk with a stack of its own: any depth, no Python recursion
                level = levels[-1]
                if level.next < len(level.names):
                    name = level.names[level.next]
                    level.next += 1
                    yield from self._child(level, name)
                else:
                    self._leave()
                yield from self._flush()
            yield from self._flush(force=True)
        finally:
            for level in self._levels:
                if level.fd is not None:
                    os.close(level.fd)
            self._levels = []

    # ---- the walk --------------------------------------------------------------------------
    def _enter(self, name: bytes, fd: int, st: os.stat_result, rules: list[exclude.Rule], magic: int,
               start: int) -> None:
        """A directory begins: its metadata, its children's names (strcmp order); it owns `fd`."""
        level = _Level(name, fd, st, magic, rules, start, self.offset)
        self._levels.append(level)
        self._out(self._metadata(st, fd, magic, fd, None, LazyPath(self._path)))
        if magic not in VIRTUAL_FS_MAGICS:
            try:
                level.names = sorted(os.fsencode(n) for n in os.listdir(fd))
            except OSError as e:
                raise EncodeError(f"cannot list {shown_path(self._path())}: {e.strerror}") from None
            if self.flags & F.EXCLUDE_FILE and b".caexclude" in level.names:
                level.rules = rules + exclude.parse_file(self._read_small(fd, b".caexclude"))
        self._bound_descriptors()

    def _leave(self) -> None:
        """A directory ends: its GOODBYE; it becomes an item of its parent, whose descriptor is
        opened again (through `..`, checked to be the same directory) if it was closed."""
        levels = self._levels
        level = levels[-1]
        self._out(F.goodbye_record(level.items, self.offset, level.entry_offset))
        try:
            if len(levels) > 1:
                parent = levels[-2]
                parent.items.append((level.start, self.offset, F.name_hash(level.name)))
                if parent.fd is None:
                    parent.fd = self._reopen_parent(level)
        finally:
            levels.pop()
            if level.fd is not None:
                os.close(level.fd)

    def _reopen_parent(self, level: _Level) -> int:
        assert level.fd is not None
        parent = self._levels[-2]
        try:
            return reopen_parent(level.fd, (parent.st.st_dev, parent.st.st_ino))
        except TreeMoved:
            raise EncodeError(f"{shown_path(self._path(levels=-1))} was moved while it was being archived") \
                from None
        except OSError as e:
            raise EncodeError(f"cannot return to {shown_path(self._path(levels=-1))}: {e.strerror}") from None

    def _bound_descriptors(self) -> None:
        """Keep at most OPEN_DIRECTORIES directory descriptors: the deepest ones, which the walk
        uses next; a shallower one is opened again when the walk climbs back to it."""
        levels = self._levels
        if len(levels) > OPEN_DIRECTORIES:
            old = levels[-OPEN_DIRECTORIES - 1]
            if old.fd is not None:
                os.close(old.fd)
                old.fd = None

    def _too_deep_for_casync(self, path: bytes | os.PathLike[bytes]) -> None:
        if not self._deep_warned and self.warn is not None:
            self._deep_warned = True
            self.warn(f"{shown_path(path)} is {CASYNC_MAX_DEPTH} levels deep or more: casync cannot read "
                      f"this archive (its limit is {CASYNC_MAX_DEPTH - 1}); pydesync can")

    def _xattr_path(self, dir_fd: int, name: bytes) -> bytes:
        """A short path to `name` in an open directory, for the xattr calls that have no *at form:
        through /proc whatever the depth (the full path only where /proc is missing)."""
        if _proc_fd_usable():
            return b"%s%d/%s" % (_PROC_FD, dir_fd, name)
        return self._path(name)

    def _path(self, name: bytes | None = None, levels: int | None = None) -> bytes:
        """The path of the directory being walked (or of `name` in it), for messages only: built
        when asked, so memory stays linear in the depth."""
        parts = [level.name for level in self._levels[1:levels]]
        if name is not None:
            parts.append(name)
        return b"/".join([self.root, *parts]) if parts else self.root

    def _child(self, parent: _Level, name: bytes) -> Iterator[bytes]:
        """One directory entry: FILENAME and the node; a directory is entered (its children follow
        on the stack), anything else is written whole."""
        parent_fd = parent.fd
        assert parent_fd is not None
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return  # vanished while we walked
        except OSError as e:
            raise EncodeError(f"cannot stat {shown_path(self._path(name))}: {e.strerror}") from None
        mode = st.st_mode
        if not self._type_enabled(mode):
            return
        is_dir, is_reg = stat.S_ISDIR(mode), stat.S_ISREG(mode)
        fd = None
        try:
            if is_dir or is_reg:
                fd = self._open(parent_fd, name, is_dir)
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) != is_reg:
                    return  # replaced while we walked
                if self.flags & F.EXCLUDE_NODUMP and read_chattr(fd) & F.FS_NODUMP_FL:
                    return
            if self.flags & F.EXCLUDE_SUBMOUNTS and st.st_dev != parent.st.st_dev:
                return
            excluded, subrules = exclude.test(parent.rules, name, is_dir)
            if excluded:
                return
            start = self.offset
            self._out(F.cstring(F.FILENAME, name))
            if len(self._levels) >= CASYNC_MAX_DEPTH:
                self._too_deep_for_casync(LazyPath(lambda: self._path(name)))
            magic = parent.magic if st.st_dev == parent.st.st_dev or fd is None else fs_magic(fd)
            if is_dir:
                assert fd is not None
                owned, fd = fd, None
                self._enter(name, owned, st, subrules, magic, start)  # the level owns it now
                return
            where = LazyPath(lambda: self._path(name))
            if is_reg:
                assert fd is not None
                size = st.st_size if magic not in VIRTUAL_FS_MAGICS else 0
                self._out(self._metadata(st, fd, magic, fd, None, where, payload_size=size))
                file_fd = fd
                yield from self._payload(where, size, lambda n: os.read(file_fd, n))
            else:
                link = self._readlink(parent_fd, name, where) if stat.S_ISLNK(mode) else None
                self._out(self._metadata(st, None, magic, self._xattr_path(parent_fd, name), link, where))
            parent.items.append((start, self.offset, F.name_hash(name)))
        finally:
            if fd is not None:
                os.close(fd)

    def _payload(self, path: bytes | os.PathLike[bytes], size: int,
                 read: Callable[[int], bytes]) -> Iterator[bytes]:
        """A file's `size` bytes as PAYLOAD contents, read in blocks; big blocks go out as they are."""
        remaining = size
        while remaining:
            try:
                block = read(min(READ_BLOCK, remaining))
            except OSError as e:
                raise EncodeError(f"cannot read {shown_path(path)}: {e.strerror}") from None
            if not block:
                raise EncodeError(f"{shown_path(path)} shrank while it was being archived")
            remaining -= len(block)
            if len(block) >= FLUSH_AT:  # big reads go out as they are, after what is queued
                yield from self._flush(force=True)
                self.offset += len(block)
                yield block
            else:
                self._out(block)
                yield from self._flush()

    # ---- helpers ---------------------------------------------------------------------------
    def _type_enabled(self, mode: int) -> bool:
        if stat.S_ISLNK(mode):
            return bool(self.flags & F.WITH_SYMLINKS)
        if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
            return bool(self.flags & F.WITH_DEVICE_NODES)
        if stat.S_ISFIFO(mode):
            return bool(self.flags & F.WITH_FIFOS)
        if stat.S_ISSOCK(mode):
            return bool(self.flags & F.WITH_SOCKETS)
        return stat.S_ISDIR(mode) or stat.S_ISREG(mode)

    def _open(self, parent_fd: int, name: bytes, directory: bool) -> int:
        try:
            return os.open(name, OPEN_FLAGS | (os.O_DIRECTORY if directory else 0), dir_fd=parent_fd)
        except OSError as e:
            raise EncodeError(f"cannot open {shown_path(self._path(name))}: {e.strerror}") from None

    def _read_small(self, dir_fd: int, name: bytes) -> bytes:
        try:
            fd = os.open(name, OPEN_FLAGS | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            raise EncodeError(f"cannot read {shown_path(self._path(name))}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(1 << 20)
        finally:
            os.close(fd)

    def _fixup_mode(self, mode: int) -> int:
        if stat.S_ISLNK(mode):
            return stat.S_IFLNK | 0o777
        kind = stat.S_IFMT(mode)
        is_dir = stat.S_ISDIR(mode)
        if self.flags & (F.WITH_PERMISSIONS | F.WITH_ACL):
            return kind | (mode & 0o7777)
        if self.flags & F.WITH_READ_ONLY:
            writable = mode & 0o222
            return kind | ((0o777 if is_dir else 0o666) if writable else (0o555 if is_dir else 0o444))
        return kind | (0o777 if is_dir else 0o666)

    def _fixup_mtime(self, mtime_ns: int) -> int:
        if self.granularity is None:
            return 0
        return mtime_ns // self.granularity * self.granularity

    def _name_for(self, ident: int, lookup) -> bytes | None:
        """casync's uid_to_name: root has no name; unknown ids are numbers unless ids are stored."""
        if ident == 0:
            return None
        name = lookup(ident)
        if name is not None:
            return os.fsencode(name)
        return None if self.has_ids else str(ident).encode()

    def _metadata(self, st: os.stat_result, fd: int | None, magic: int, xattrs_at: int | bytes,
                  link: bytes | None, path: bytes | os.PathLike[bytes], payload_size: int = 0) -> bytes:
        """ENTRY, the metadata records, and the content header (PAYLOAD/SYMLINK/DEVICE) of a node.
        `xattrs_at` is where its xattrs are read (its descriptor, or a path to it that never follows
        it), `link` a symlink's target, `path` its name in messages."""
        flags = self.flags
        mode = st.st_mode
        is_dir, is_reg, is_lnk = stat.S_ISDIR(mode), stat.S_ISREG(mode), stat.S_ISLNK(mode)
        uid, gid = (st.st_uid, st.st_gid) if self.has_ids else (0, 0)
        if flags & F.WITH_16BIT_UIDS and (uid > 0xFFFF or gid > 0xFFFF):
            raise EncodeError(f"{shown_path(path)}: uid/gid does not fit 16 bits")
        entry_flags = 0
        if fd is not None and (is_dir or is_reg):
            if flags & F.WITH_CHATTR:
                chattr = read_chattr(fd)
                for bit, value in F.CHATTR_TO_FLAG.items():
                    if chattr & bit:
                        entry_flags |= value & flags
            if is_dir and flags & F.WITH_SUBVOLUME:
                sub, ro = btrfs_subvolume(fd, st, magic)
                entry_flags |= ((F.WITH_SUBVOLUME if sub else 0) | (F.WITH_SUBVOLUME_RO if ro else 0)) & flags
        out = [_ENTRY.pack(F.ENTRY_SIZE, F.ENTRY, flags, self._fixup_mode(mode), entry_flags, uid, gid,
                           self._fixup_mtime(st.st_mtime_ns))]
        if flags & F.WITH_USER_NAMES:
            out.extend(self._owner_records(st.st_uid, st.st_gid, user_name, group_name))
        # One listxattr tells which of the xattr-borne features exist; only those are read.
        present = self._xattr_names(xattrs_at, path) if flags & XATTR_FEATURES else set()
        if present:
            out.extend(self._xattr_borne_records(path, mode, present,
                                                 lambda name: get_xattr(xattrs_at, name)))
        if flags & F.WITH_QUOTA_PROJID and fd is not None and (is_dir or is_reg) \
                and magic in (EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, FUSE_SUPER_MAGIC):
            projid = read_projid(fd)
            if projid:
                out.append(F.record(F.QUOTA_PROJID, struct.pack("<Q", projid)))
        if is_reg:
            out.append(F.HEADER.pack(16 + payload_size, F.PAYLOAD))
        elif is_lnk:
            out.append(F.cstring(F.SYMLINK, link or b""))
        elif stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
            out.append(F.record(F.DEVICE, struct.pack("<QQ", os.major(st.st_rdev), os.minor(st.st_rdev))))
        return b"".join(out)

    def _owner_records(self, uid: int, gid: int, user_lookup: Callable[[int], str | None],
                       group_lookup: Callable[[int], str | None]) -> list[bytes]:
        """USER and GROUP, by casync's naming rule (_name_for)."""
        out = []
        user = self._name_for(uid, user_lookup)
        group = self._name_for(gid, group_lookup)
        if user is not None:
            out.append(F.cstring(F.USER, user))
        if group is not None:
            out.append(F.cstring(F.GROUP, group))
        return out

    def _xattr_borne_records(self, path: bytes | os.PathLike[bytes], mode: int, present: set[bytes],
                             get: Callable[[str], bytes | None]) -> list[bytes]:
        """The records that come from xattrs (XATTR, ACL*, SELINUX, FCAPS), in casync's order;
        `present` names the xattrs there are, `get` reads one."""
        flags = self.flags
        is_lnk = stat.S_ISLNK(mode)
        out: list[bytes] = []
        if not is_lnk:
            out.extend(self._xattr_records(present, get))
            if flags & F.WITH_ACL and present & ACL_NAMES:
                out.extend(self._acl_records(path, stat.S_ISDIR(mode), present, get))
        if flags & F.WITH_SELINUX and b"security.selinux" in present:
            label = get("security.selinux")
            if label:
                out.append(F.cstring(F.SELINUX, label.rstrip(b"\0")))
        if not is_lnk and flags & F.WITH_FCAPS and stat.S_ISREG(mode) and b"security.capability" in present:
            caps = get("security.capability")
            if caps is not None:
                out.append(F.record(F.FCAPS, caps))
        return out

    @staticmethod
    def _readlink(dir_fd: int, name: bytes, path: bytes | os.PathLike[bytes]) -> bytes:
        try:
            return os.readlink(name, dir_fd=dir_fd)
        except OSError as e:
            raise EncodeError(f"cannot read link {shown_path(path)}: {e.strerror}") from None

    @staticmethod
    def _xattr_names(at: int | bytes, path: bytes | os.PathLike[bytes]) -> set[bytes]:
        try:
            return {os.fsencode(n) for n in list_xattrs(at)}
        except OSError as e:
            raise EncodeError(f"cannot list xattrs of {shown_path(path)}: {e.strerror}") from None

    def _xattr_records(self, present: set[bytes], get: Callable[[str], bytes | None]) -> list[bytes]:
        if not self.flags & F.WITH_XATTRS:
            return []
        out = []
        for name in sorted(present):
            if not (name.startswith((b"user.", b"trusted.")) and _valid_xattr_name(name)):
                continue
            value = get(os.fsdecode(name))
            if value is not None:
                out.append(F.record(F.XATTR, name + b"\0" + value))
        return out

    def _acl_records(self, path: bytes | os.PathLike[bytes], is_dir: bool, present: set[bytes],
                     get: Callable[[str], bytes | None]) -> list[bytes]:
        out: list[bytes] = []
        try:
            access_raw = get(ACL_XATTR_ACCESS) if ACL_ACCESS in present else None
            default_raw = get(ACL_XATTR_DEFAULT) if is_dir and ACL_DEFAULT in present else None
            access = PosixAcl.parse(access_raw) if access_raw else None
            default = PosixAcl.parse(default_raw) if default_raw else None
        except (OSError, ValueError) as e:
            raise EncodeError(f"cannot read the ACL of {shown_path(path)}: {e}") from None
        if access is not None:
            out += self._acl_entries(F.ACL_USER, access.users, user_name)
            out += self._acl_entries(F.ACL_GROUP, access.groups, group_name)
            if access.group_obj is not None and access.mask is not None:
                out.append(F.record(F.ACL_GROUP_OBJ, struct.pack("<Q", access.group_obj)))
        if default is not None:
            fields = (default.user_obj, default.group_obj, default.other, default.mask)
            if any(v is not None for v in fields):
                out.append(F.record(F.ACL_DEFAULT, struct.pack("<4Q", *(
                    F.NO_PERMS if v is None else v for v in fields))))
            out += self._acl_entries(F.ACL_DEFAULT_USER, default.users, user_name)
            out += self._acl_entries(F.ACL_DEFAULT_GROUP, default.groups, group_name)
        return out

    def _acl_entries(self, kind: int, entries: list[tuple[int, int]], lookup) -> list[bytes]:
        rows = []
        for ident, perm in entries:
            name = self._name_for(ident, lookup) if self.flags & F.WITH_USER_NAMES else None
            stored = ident if self.has_ids else 0
            rows.append((stored, name is not None, name or b"", perm, name))
        rows.sort(key=lambda r: r[:4])
        return [F.record(kind, struct.pack("<QQ", stored, perm) + (name + b"\0" if name is not None else b""))
                for stored, _has, _n, perm, name in rows]
