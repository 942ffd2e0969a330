"""A catar as a tar stream (`untar --output-format=gnu-tar`), written by the standard library's
tarfile: GNU headers for what GNU tar carries, a PAX header for an entry with xattrs (as desync
writes them, after Go's archive/tar), in the archive's order."""

from __future__ import annotations

import io
import stat
import tarfile
from collections.abc import Callable, Iterable
from typing import BinaryIO

from ..errors import PydesyncError
from .decoder import DirectoryEnd, Node

_TYPES = {stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFREG: tarfile.REGTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
          stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}


def write_tar(items: Iterable[Node | DirectoryEnd], out: BinaryIO,
              warn: Callable[[str], None] | None = None) -> int:
    """Write the archive's entries to `out` as a tar stream, the root directory first as `./`
    (desync's first member is `.`; a tar read back keeps the root's metadata); returns the entries
    written. What tar cannot hold (a socket) is left out with a warning."""
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for item in items:
            if isinstance(item, DirectoryEnd):
                continue
            info = tar_info(item)
            if info is None:
                if warn is not None:
                    warn(f"{_name(item.path)}: a socket cannot be stored in a tar archive; left out")
                continue
            tar.format = tarfile.PAX_FORMAT if info.pax_headers else tarfile.GNU_FORMAT
            payload = item.read_payload() if item.is_file else b""
            tar.addfile(info, io.BytesIO(payload) if item.is_file else None)
            count += 1
    return count


def tar_info(node: Node) -> tarfile.TarInfo | None:
    """The tar header of one entry (None for a socket)."""
    kind = _TYPES.get(stat.S_IFMT(node.mode))
    if kind is None:
        return None
    info = tarfile.TarInfo((_name(node.path) or ".") + ("/" if node.is_dir else ""))
    info.type = kind
    info.mode = stat.S_IMODE(node.mode)
    info.uid, info.gid = node.uid, node.gid
    info.uname = _name(node.user or b"")
    info.gname = _name(node.group or b"")
    info.mtime = node.mtime // 1_000_000_000 if node.mtime >= 0 else 0
    if node.is_file:
        info.size = node.size or 0
    elif kind == tarfile.SYMTYPE:
        info.linkname = _name(node.target or b"")
    elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if node.rdev is None:
            raise PydesyncError(f"{_name(node.path)}: a device without its numbers")
        info.devmajor, info.devminor = node.rdev
    if node.xattrs:
        info.pax_headers = {f"SCHILY.xattr.{_name(k)}": v.decode("utf-8", "surrogateescape")
                            for k, v in node.xattrs}
    return info


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
