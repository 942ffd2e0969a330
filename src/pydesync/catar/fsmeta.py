"""Reading and writing the file metadata a catar carries: chattr flags, project ids, filesystem
types, POSIX ACLs (in the kernel's xattr encoding), user and group names.

Everything here degrades the way casync does: a filesystem that does not
support a feature reports none of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import grp
import os
import pwd
import struct
from dataclasses import dataclass, field

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419
BTRFS_SUBVOL_RDONLY = 0x2

UNSUPPORTED = {errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}

# statfs magic numbers casync cares about
EXT4_SUPER_MAGIC = 0xEF53
XFS_SUPER_MAGIC = 0x58465342
FUSE_SUPER_MAGIC = 0x65735546
MSDOS_SUPER_MAGIC = 0x4D44
BTRFS_SUPER_MAGIC = 0x9123683E
VIRTUAL_FS_MAGICS = {
    0x42494E4D, 0x63677270, 0x27E0EB, 0x62656570, 0x64626720, 0x1CD1, 0xDE5E81E4, 0x65735543,
    0x958458F6, 0x19800202, 0x6E667364, 0x9FA0, 0x6165676C, 0x67596969, 0x73636673, 0xF97CFF8C,
    0x43415D53, 0x62656572,
}


def read_chattr(fd: int) -> int:
    """FS_IOC_GETFLAGS; 0 where the filesystem or node type has no such flags."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return 0
        raise
    return struct.unpack("<I", buf)[0]


def write_chattr(fd: int, value: int, mask: int) -> None:
    """Set the chattr bits in `mask` to `value` (others kept)."""
    old = read_chattr(fd)
    new = (old & ~mask) | (value & mask)
    if new != old:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", new))


def read_projid(fd: int) -> int:
    """Quota project id (struct fsxattr.fsx_projid), 0 if unsupported."""
    buf = bytearray(28)
    try:
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return 0
        raise
    return struct.unpack_from("<I", buf, 12)[0]


def write_projid(fd: int, projid: int) -> None:
    buf = bytearray(28)
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    struct.pack_into("<I", buf, 12, projid)
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, bytes(buf))


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def fs_magic(fd: int) -> int:
    """The filesystem type (statfs f_type) of an open file."""
    buf = _StatFs()
    if _libc().fstatfs(fd, ctypes.byref(buf)) != 0:
        return 0
    return buf.f_type & 0xFFFFFFFF


def btrfs_subvolume(fd: int, st: os.stat_result, magic: int) -> tuple[bool, bool]:
    """(is a subvolume, is read-only) for a directory."""
    if magic != BTRFS_SUPER_MAGIC or st.st_ino != 256:
        return False, False
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, buf)
    except OSError:
        return True, False
    return True, bool(struct.unpack("<Q", buf)[0] & BTRFS_SUBVOL_RDONLY)


# ---- POSIX ACLs in the kernel's xattr format ------------------------------------------------
ACL_XATTR_ACCESS = "system.posix_acl_access"
ACL_XATTR_DEFAULT = "system.posix_acl_default"
ACL_VERSION = 2
TAG_USER_OBJ, TAG_USER, TAG_GROUP_OBJ, TAG_GROUP, TAG_MASK, TAG_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF


@dataclass
class PosixAcl:
    """One ACL: object permissions (None = absent) and named user/group entries (id, perm)."""

    user_obj: int | None = None
    group_obj: int | None = None
    other: int | None = None
    mask: int | None = None
    users: list[tuple[int, int]] = field(default_factory=list)
    groups: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: bytes) -> PosixAcl:
        if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != ACL_VERSION:
            raise ValueError("malformed POSIX ACL xattr")
        acl = cls()
        for off in range(4, len(raw), 8):
            tag, perm, ident = struct.unpack_from("<HHI", raw, off)
            perm &= 7
            if tag == TAG_USER_OBJ:
                acl.user_obj = perm
            elif tag == TAG_GROUP_OBJ:
                acl.group_obj = perm
            elif tag == TAG_OTHER:
                acl.other = perm
            elif tag == TAG_MASK:
                acl.mask = perm
            elif tag == TAG_USER:
                acl.users.append((ident, perm))
            elif tag == TAG_GROUP:
                acl.groups.append((ident, perm))
        return acl

    def encode(self) -> bytes:
        """Kernel xattr bytes; entries in the order the kernel requires (by tag, then id)."""
        entries = []
        if self.user_obj is not None:
            entries.append((TAG_USER_OBJ, self.user_obj, UNDEFINED_ID))
        entries += [(TAG_USER, p, i) for i, p in sorted(self.users)]
        if self.group_obj is not None:
            entries.append((TAG_GROUP_OBJ, self.group_obj, UNDEFINED_ID))
        entries += [(TAG_GROUP, p, i) for i, p in sorted(self.groups)]
        if self.mask is not None:
            entries.append((TAG_MASK, self.mask, UNDEFINED_ID))
        if self.other is not None:
            entries.append((TAG_OTHER, self.other, UNDEFINED_ID))
        return struct.pack("<I", ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def get_xattr(path: bytes | int, name: str) -> bytes | None:
    """An xattr of `path` (never following a symlink) or of an open descriptor; None if absent."""
    try:
        if isinstance(path, int):
            return os.getxattr(path, name)
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return None
        raise


def list_xattrs(path: bytes | int) -> list[str]:
    """The xattr names of `path` (never following a symlink) or of an open descriptor."""
    try:
        if isinstance(path, int):
            return os.listxattr(path)
        return os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM):
            return []
        raise


# ---- names ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
