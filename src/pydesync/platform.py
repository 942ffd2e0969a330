"""Every Linux system call and ioctl pydesync makes beyond what `os` offers, in one place, each
with the way it falls back where the kernel, the filesystem or libc lacks it.

- chattr flags (FS_IOC_GETFLAGS/SETFLAGS) and project ids (FS_IOC_FSGETXATTR): read as 0 where
  the filesystem has none (UNSUPPORTED errors), as casync reads them;
- the filesystem type (fstatfs through libc): 0 when it cannot be told;
- btrfs subvolumes (BTRFS_IOC_SUBVOL_*): a directory that is not one reads as a plain directory;
  creating one is the caller's to replace by a plain directory when refused;
- FAT attributes (FAT_IOCTL_*): only on FAT (or FUSE) filesystems; errors are the caller's to report;
- xattrs: absent or unsupported reads as none;
- renameat2(RENAME_NOREPLACE): where libc or the kernel lacks it, lstat then rename (a race window
  a concurrent writer could use, as before renameat2 existed);
- FICLONERANGE (reflinks on btrfs, xfs): where the filesystem cannot, the caller copies;
- SIOCOUTQ (bytes a socket has not sent yet): an OSError where it is not known.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import struct
import termios
from collections.abc import Callable

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


def _read_u32(fd: int, request: int, size: int, offset: int) -> int:
    """The u32 at `offset` of what a reading ioctl fills; 0 where the filesystem or node type
    does not support it (UNSUPPORTED)."""
    buf = bytearray(size)
    try:
        fcntl.ioctl(fd, request, buf)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return 0
        raise
    return int(struct.unpack_from("<I", buf, offset)[0])


def read_chattr(fd: int) -> int:
    """FS_IOC_GETFLAGS; 0 where the filesystem or node type has no such flags."""
    return _read_u32(fd, FS_IOC_GETFLAGS, 4, 0)


def write_chattr(fd: int, value: int, mask: int) -> None:
    """Set the chattr bits in `mask` to `value` (others kept)."""
    old = read_chattr(fd)
    new = (old & ~mask) | (value & mask)
    if new != old:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", new))


def read_projid(fd: int) -> int:
    """Quota project id (struct fsxattr.fsx_projid), 0 if unsupported."""
    return _read_u32(fd, FS_IOC_FSGETXATTR, 28, 12)


def write_projid(fd: int, projid: int) -> None:
    buf = bytearray(28)
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    struct.pack_into("<I", buf, 12, projid)
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, bytes(buf))


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def fs_magic(fd: int) -> int:
    """The filesystem type (statfs f_type) of an open file."""
    buf = _StatFs()
    if libc().fstatfs(fd, ctypes.byref(buf)) != 0:
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



BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A


def create_btrfs_subvolume(dir_fd: int, name: bytes) -> None:
    """A btrfs subvolume `name` in the directory dir_fd (OSError when refused: not btrfs, a name
    too long, EEXIST)."""
    if len(name) >= 4088:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    fcntl.ioctl(dir_fd, BTRFS_IOC_SUBVOL_CREATE, struct.pack("<q", 0) + name.ljust(4088, b"\0"))


def make_subvolume_read_only(fd: int) -> None:
    buf = bytearray(8)
    fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, buf)
    flags = struct.unpack("<Q", buf)[0] | BTRFS_SUBVOL_RDONLY
    fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, struct.pack("<Q", flags))


FAT_IOCTL_GET_ATTRIBUTES = 0x80047210
FAT_IOCTL_SET_ATTRIBUTES = 0x40047211


def write_fat_attributes(fd: int, value: int, mask: int) -> None:
    """Set the FAT attribute bits in `mask` to `value` (others kept); OSError when refused."""
    buf = bytearray(4)
    fcntl.ioctl(fd, FAT_IOCTL_GET_ATTRIBUTES, buf)
    old = struct.unpack("<I", buf)[0]
    new = (old & ~mask) | value
    if new != old:
        fcntl.ioctl(fd, FAT_IOCTL_SET_ATTRIBUTES, struct.pack("<I", new))


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


RENAME_NOREPLACE = 0x1
_renameat2: Callable[..., int] | None = None
_renameat2_checked = False


def rename_noreplace(dir_fd: int, old: bytes, new: bytes) -> None:
    """renameat2(RENAME_NOREPLACE): FileExistsError if `new` exists (lstat + rename as a fallback)."""
    global _renameat2, _renameat2_checked
    if not _renameat2_checked:
        _renameat2_checked = True
        func = getattr(libc(), "renameat2", None)
        if func is not None:
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _renameat2 = func
    if _renameat2 is not None:
        if _renameat2(dir_fd, old, dir_fd, new, RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), os.fsdecode(new))
    try:
        os.lstat(new, dir_fd=dir_fd)
    except FileNotFoundError:
        os.rename(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(new))


FICLONERANGE = 0x4020940D


def clone_range(src_fd: int, src_offset: int, length: int, dst_fd: int, dst_offset: int,
                blocksize: int) -> int:
    """FICLONERANGE the block-aligned interior of a range; returns the bytes cloned (0: none, and
    the caller copies all). Raises OSError when the filesystem cannot clone (caller stops trying)."""
    if src_offset % blocksize != dst_offset % blocksize:
        return 0
    head = -src_offset % blocksize
    body = (length - head) // blocksize * blocksize
    if body <= 0:
        return 0
    fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("qQQQ", src_fd, src_offset + head, body, dst_offset + head))
    return body


def clone_unsupported(e: OSError) -> bool:
    """Whether a clone_range error means 'this filesystem (or pair of files) cannot clone'."""
    return e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF,
                       errno.EPERM, errno.ETXTBSY)


def unsent_bytes(sock_fd: int) -> int:
    """Bytes in a socket's send queue not yet taken by the peer (SIOCOUTQ, Linux's TIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock_fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
