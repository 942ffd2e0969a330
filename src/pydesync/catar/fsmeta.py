"""The file metadata a catar carries that is more than a system call: POSIX ACLs (in the
kernel's xattr encoding) and user and group names. The calls themselves (chattr flags, project
ids, filesystem types, xattrs, btrfs and FAT ioctls) are in pydesync.platform.

Everything here degrades the way casync does: a filesystem that does not
support a feature reports none of it.
"""

from __future__ import annotations

import functools
import grp
import pwd
import struct
from dataclasses import dataclass, field

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
