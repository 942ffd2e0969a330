"""The catar archive format: record types, feature flags and goodbye tables (casync's caformat.h)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .. import _siphash
from ..errors import UsageError

# ---- record types ---------------------------------------------------------------------------
ENTRY = 0x1396FABCEA5BBB51
USER = 0xF453131AAEEACCB3
GROUP = 0x25EB6AC969396A52
XATTR = 0xB8157091F80BC486
ACL_USER = 0x297DC88B2EF12FAF
ACL_GROUP = 0x36F2ACB56CB3DD0B
ACL_GROUP_OBJ = 0x23047110441F38F3
ACL_DEFAULT = 0xFE3EEDA6823C8CD0
ACL_DEFAULT_USER = 0xBDF03DF9BD010A91
ACL_DEFAULT_GROUP = 0xA0CB1168782D1F51
SELINUX = 0x46FAF0602FD26C59
FCAPS = 0xF7267DB0AFED0629
QUOTA_PROJID = 0x161BAF2D8772A72B
SYMLINK = 0x664A6FB6830E0D6C
DEVICE = 0xAC3DACE369DFE643
PAYLOAD = 0x8B9E1D93D6DCFFC9
FILENAME = 0x6DBB6EBCB3161F0B
GOODBYE = 0xDFD35C5E8327C403
GOODBYE_TAIL_MARKER = 0x57446FA533702943

RECORD_NAMES = {
    ENTRY: "ENTRY", USER: "USER", GROUP: "GROUP", XATTR: "XATTR", ACL_USER: "ACL_USER",
    ACL_GROUP: "ACL_GROUP", ACL_GROUP_OBJ: "ACL_GROUP_OBJ", ACL_DEFAULT: "ACL_DEFAULT",
    ACL_DEFAULT_USER: "ACL_DEFAULT_USER", ACL_DEFAULT_GROUP: "ACL_DEFAULT_GROUP", SELINUX: "SELINUX",
    FCAPS: "FCAPS", QUOTA_PROJID: "QUOTA_PROJID", SYMLINK: "SYMLINK", DEVICE: "DEVICE",
    PAYLOAD: "PAYLOAD", FILENAME: "FILENAME", GOODBYE: "GOODBYE",
}

HEADER = struct.Struct("<QQ")
ENTRY_SIZE = 64
NO_PERMS = 0xFFFFFFFFFFFFFFFF  # an absent ACL_DEFAULT field

GOODBYE_KEY = bytes.fromhex("b3841d0f2b447485c12ec2d130ed3627")

# ---- feature flags --------------------------------------------------------------------------
FLAG_BITS: dict[str, int] = {
    "16bit-uids": 0x1, "32bit-uids": 0x2, "user-names": 0x4, "sec-time": 0x8, "usec-time": 0x10,
    "nsec-time": 0x20, "2sec-time": 0x40, "read-only": 0x80, "permissions": 0x100, "symlinks": 0x200,
    "device-nodes": 0x400, "fifos": 0x800, "sockets": 0x1000, "flag-hidden": 0x2000,
    "flag-system": 0x4000, "flag-archive": 0x8000, "flag-append": 0x10000, "flag-noatime": 0x20000,
    "flag-compr": 0x40000, "flag-nocow": 0x80000, "flag-nodump": 0x100000, "flag-dirsync": 0x200000,
    "flag-immutable": 0x400000, "flag-sync": 0x800000, "flag-nocomp": 0x1000000,
    "flag-projinherit": 0x2000000, "subvolume": 0x4000000, "subvolume-ro": 0x8000000,
    "xattrs": 0x10000000, "acl": 0x20000000, "selinux": 0x40000000, "fcaps": 0x80000000,
    "quota-projid": 0x100000000,
}
WITH_16BIT_UIDS, WITH_32BIT_UIDS, WITH_USER_NAMES = 0x1, 0x2, 0x4
WITH_SEC_TIME, WITH_USEC_TIME, WITH_NSEC_TIME, WITH_2SEC_TIME = 0x8, 0x10, 0x20, 0x40
WITH_READ_ONLY, WITH_PERMISSIONS = 0x80, 0x100
WITH_SYMLINKS, WITH_DEVICE_NODES, WITH_FIFOS, WITH_SOCKETS = 0x200, 0x400, 0x800, 0x1000
WITH_FLAG_NODUMP = 0x100000
WITH_SUBVOLUME, WITH_SUBVOLUME_RO = 0x4000000, 0x8000000
WITH_XATTRS, WITH_ACL, WITH_SELINUX, WITH_FCAPS, WITH_QUOTA_PROJID = (
    0x10000000, 0x20000000, 0x40000000, 0x80000000, 0x100000000)
WITH_MASK = 0x1FFFFFFFF
WITH_FAT_ATTRS = 0xE000
WITH_CHATTR = 0x3FF0000
EXCLUDE_FILE = 0x1000000000000000
SHA512_256 = 0x2000000000000000
EXCLUDE_SUBMOUNTS = 0x4000000000000000
EXCLUDE_NODUMP = 0x8000000000000000
FEATURE_FLAGS_MAX = 0xF0000001FFFFFFFF

FLAG_SETS: dict[str, int] = {
    "best": 0x1FFFFFE26, "unix": 0x1F09, "fat": 0xE0C0, "chattr": WITH_CHATTR, "fat-attrs": WITH_FAT_ATTRS,
    "privileged": 0x1EC414407, "fuse": 0x13FFFFFB, "all": WITH_MASK,
}

# Linux chattr (FS_*_FL) bits -> casync flag bits, and FAT attributes.
CHATTR_TO_FLAG = {
    0x20: 0x10000, 0x80: 0x20000, 0x4: 0x40000, 0x800000: 0x80000, 0x40: 0x100000, 0x10000: 0x200000,
    0x10: 0x400000, 0x8: 0x800000, 0x400: 0x1000000, 0x20000000: 0x2000000,
}
FS_NODUMP_FL = 0x40
FAT_TO_FLAG = {0x2: 0x2000, 0x4: 0x4000, 0x20: 0x8000}

# Time granularity in nanoseconds per time flag, finest first.
TIME_GRANULARITY = ((WITH_NSEC_TIME, 1), (WITH_USEC_TIME, 1000), (WITH_SEC_TIME, 10**9),
                    (WITH_2SEC_TIME, 2 * 10**9))


def normalize_flags(flags: int) -> int:
    """casync's normalisation: keep only the strongest of overlapping features."""
    if flags & WITH_ACL and not flags & (WITH_16BIT_UIDS | WITH_32BIT_UIDS | WITH_USER_NAMES):
        flags |= WITH_32BIT_UIDS | WITH_USER_NAMES
    if flags & WITH_32BIT_UIDS:
        flags &= ~WITH_16BIT_UIDS
    if flags & WITH_NSEC_TIME:
        flags &= ~(WITH_USEC_TIME | WITH_SEC_TIME | WITH_2SEC_TIME)
    if flags & WITH_USEC_TIME:
        flags &= ~(WITH_SEC_TIME | WITH_2SEC_TIME)
    if flags & WITH_SEC_TIME:
        flags &= ~WITH_2SEC_TIME
    if flags & WITH_ACL:
        flags &= ~(WITH_PERMISSIONS | WITH_READ_ONLY)
    if flags & WITH_PERMISSIONS:
        flags &= ~WITH_READ_ONLY
    if flags & EXCLUDE_NODUMP:
        flags &= ~WITH_FLAG_NODUMP
    if flags & WITH_SUBVOLUME_RO:
        flags |= WITH_SUBVOLUME
    return flags


def parse_feature(name: str) -> int:
    """A --with/--without value: one feature name or a named set."""
    if name in FLAG_BITS:
        return FLAG_BITS[name]
    if name in FLAG_SETS:
        return FLAG_SETS[name]
    raise UsageError(f"unknown feature '{name}' (known: {', '.join([*FLAG_BITS, *FLAG_SETS])})")


def archive_flags(with_: Sequence[str] = (), without: Sequence[str] = (), digest_sha512_256: bool = True,
                  exclude_nodump: bool = True, exclude_submounts: bool = False,
                  exclude_file: bool = True) -> int:
    """Feature flags for a new archive, from casync-style --with/--without (defaults: everything)."""
    chosen = 0
    for name in with_:
        chosen |= parse_feature(name)
    flags = chosen or WITH_MASK
    for name in without:
        flags &= ~parse_feature(name)
    flags |= (SHA512_256 if digest_sha512_256 else 0) | (EXCLUDE_NODUMP if exclude_nodump else 0)
    flags |= (EXCLUDE_SUBMOUNTS if exclude_submounts else 0) | (EXCLUDE_FILE if exclude_file else 0)
    return normalize_flags(flags)


def format_flags(flags: int) -> str:
    """Feature names set in flags (for messages and `digest -v`)."""
    return " ".join(name for name, bit in FLAG_BITS.items() if flags & bit)


def time_granularity(flags: int) -> int | None:
    """Nanoseconds an mtime is rounded down to, or None when times are not stored."""
    for bit, ns in TIME_GRANULARITY:
        if flags & bit:
            return ns
    return None


# ---- records --------------------------------------------------------------------------------
def record(kind: int, body: bytes) -> bytes:
    return HEADER.pack(16 + len(body), kind) + body


def cstring(kind: int, text: bytes) -> bytes:
    return record(kind, text + b"\0")


def name_hash(name: bytes) -> int:
    """SipHash-2-4 of a file name with casync's fixed key (goodbye tables)."""
    return _siphash.siphash24(GOODBYE_KEY, name)


def eytzinger_order(count: int) -> list[int]:
    """For heap positions 0..count-1, the sorted index each holds (complete BST, in-order = sorted)."""
    order = [0] * count
    next_sorted = 0
    # iterative in-order walk over heap indices
    stack: list[int] = []
    node = 0
    while stack or node < count:
        while node < count:
            stack.append(node)
            node = 2 * node + 1
        node = stack.pop()
        order[node] = next_sorted
        next_sorted += 1
        node = 2 * node + 2
    return order


def goodbye_record(items: Iterable[tuple[int, int, int]], goodbye_offset: int, entry_offset: int) -> bytes:
    """GOODBYE for a directory: items are (start, end, hash) of each child, in any order."""
    ordered = sorted(items, key=lambda it: (it[2], it[0]))
    layout = [ordered[i] for i in eytzinger_order(len(ordered))]
    size = 16 + 24 * len(layout) + 24
    body = b"".join(struct.pack("<QQQ", goodbye_offset - start, end - start, h) for start, end, h in layout)
    tail = struct.pack("<QQQ", goodbye_offset - entry_offset, size, GOODBYE_TAIL_MARKER)
    return HEADER.pack(size, GOODBYE) + body + tail
