"""A generated directory tree that exercises every corner of the catar format.

`build_tree(root)` creates, deterministically (fixed contents, modes, mtimes):

* `big/`: 1,000 entries in one directory (files, some empty);
* `names/`: unicode (NFC and NFD), emoji, spaces, `#`, backslash, tab and
  newline, non-UTF-8 bytes, and names of `long_name` bytes (255 by default;
  ASCII and 2-byte UTF-8), a 255-byte directory name;
* `deep/`: `depth` levels of nesting with a file at the bottom;
* hard links (`hard/orig`, `hard/link1`, `hardlink-at-root`: casync stores
  each as a full file);
* sparse files (a hole with data in the middle, a file that is all hole);
* empty files, empty directories (also nested), setuid, setgid and sticky
  modes on files and directories, symlinks (relative, absolute, dangling, to a
  directory, a 300-byte target, a loop), a fifo, a `user.*` xattr;
* as root also: files owned by other uids/gids (one without a name), a
  char and a block device, a `trusted.*` xattr, a read-only directory.

casync limits to keep in mind when choosing the parameters: `casync make`
refuses trees deeper than 63 path components (NODES_MAX 64, root included:
E2BIG), and `casync extract` cannot create non-directories whose name is
longer than 237 bytes (its temporary name `.#<name><16 hex>` would exceed
255). So `depth=61` (deep/ + 61 levels + a file = 63 components) and
`long_name=237` give a tree casync can pack and restore.
"""

from __future__ import annotations

import hashlib
import os
import stat

MTIME_NS = 1_650_000_000_987_654_321
PORTABLE = ["permissions", "nsec-time", "symlinks", "device-nodes", "fifos", "sockets"]
CASYNC_MAX_DEPTH = 61  # deepest `deep/` nesting `casync make` accepts (with the bottom file)
CASYNC_MAX_EXTRACT_NAME = 237  # longest file name `casync extract` can create


def _write(path: bytes, data: bytes = b"", mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def build_tree(root: str | os.PathLike[str], privileged: bool | None = None, depth: int = 100,
               long_name: int = 255) -> None:
    """Create the tree at `root` (which must not exist)."""
    if privileged is None:
        privileged = os.geteuid() == 0
    top = os.fsencode(root)
    j = os.path.join
    os.mkdir(top)

    big = j(top, b"big")
    os.mkdir(big)
    for i in range(1000):
        _write(j(big, b"e%04d" % i), b"%d\n" % i * (i % 5))

    names = j(top, b"names")
    os.mkdir(names)
    long_utf8 = "\u00e9" * ((long_name - 1) // 2) + "x" * (2 - long_name % 2)  # long_name bytes
    for name in ["\u00fcn\u00efc\u00f8d\u00e9", "\u65e5\u672c\u8a9e\u306e\u30d5\u30a1\u30a4\u30eb",
                 "e\u0301te\u0301", "emoji \U0001f642", "sp ace", "hash#tag", "back\\slash",
                 "tab\tand\nnewline", "quote\"'", "-dash", "~tilde", "Zupper", "n" * long_name, long_utf8]:
        _write(j(names, name.encode()), name.encode()[:50])
    _write(j(names, b"latin1-\xe9\xff"), b"not utf-8")
    long_dir = j(names, b"D" * 255)
    os.mkdir(long_dir)
    _write(j(long_dir, b"x" * long_name), b"long\n")

    d = j(top, b"deep")
    os.mkdir(d)
    for i in range(depth):
        d = j(d, b"%02d" % i)
        os.mkdir(d)
    _write(j(d, b"bottom"), b"%d levels down\n" % depth)

    hard = j(top, b"hard")
    os.mkdir(hard)
    _write(j(hard, b"orig"), hashlib.sha256(b"hard").digest() * 300)
    os.link(j(hard, b"orig"), j(hard, b"link1"))
    os.link(j(hard, b"orig"), j(top, b"hardlink-at-root"))

    with open(j(top, b"sparse"), "wb") as f:
        f.seek(3 << 20)
        f.write(b"data in the middle of a hole")
        f.truncate(6 << 20)
    with open(j(top, b"sparse-hole-only"), "wb") as f:
        f.truncate(1 << 20)

    _write(j(top, b"empty"), b"", 0o600)
    os.mkdir(j(top, b"emptydir"))
    os.makedirs(j(top, b"emptydirs/a/b/c"))
    _write(j(top, b"setuid"), b"#!/bin/sh\n", 0o4755)
    _write(j(top, b"setgid"), b"#!/bin/sh\n", 0o2755)
    _write(j(top, b"all-special-bits"), b"x", 0o7555)
    os.mkdir(j(top, b"setgid-dir"))
    _write(j(top, b"setgid-dir/inside"), b"in\n")
    os.mkdir(j(top, b"sticky-dir"))
    _write(j(top, b"sticky-dir/inside"), b"in\n")

    os.symlink(b"big/e0001", j(top, b"sym-rel"))
    os.symlink(b"/etc/passwd", j(top, b"sym-abs"))
    os.symlink(b"nowhere/at/all", j(top, b"sym-dangling"))
    os.symlink(b"deep", j(top, b"sym-dir"))
    os.symlink(b"t/" * 150, j(top, b"sym-long"))
    os.symlink("names/\u00fcn\u00efc\u00f8d\u00e9".encode(), j(top, b"sym-unicode"))
    os.symlink(b"sym-loop", j(top, b"sym-loop"))
    os.mkfifo(j(top, b"fifo"))
    os.chmod(j(top, b"fifo"), 0o640)
    os.setxattr(j(names, b"sp ace"), b"user.comment", b"an xattr\x00with NUL")

    dirmodes = {b"setgid-dir": 0o2775, b"sticky-dir": 0o1777, b"emptydirs/a": 0o700}
    if privileged:
        _write(j(top, b"owned-1234"), b"owned\n")
        os.chown(j(top, b"owned-1234"), 1234, 5678)
        _write(j(top, b"owned-nobody"), b"nobody\n")
        os.chown(j(top, b"owned-nobody"), 65534, 65534)
        os.lchown(j(top, b"sym-rel"), 65534, 65534)
        os.mknod(j(top, b"null-dev"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(j(top, b"loop-dev"), 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.setxattr(j(hard, b"orig"), b"trusted.test", b"trusted value")
        os.mkdir(j(top, b"ro-dir"))
        _write(j(top, b"ro-dir/file"), b"in a read-only dir\n", 0o444)
        dirmodes[b"ro-dir"] = 0o555
    for name, mode in dirmodes.items():
        os.chmod(j(top, name), mode)
    os.chmod(top, 0o755)

    # Distinct mtimes with nanoseconds, deepest first so directory mtimes stick.
    entries: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(top):
        entries += [j(dirpath, n) for n in dirnames + filenames]
    entries.sort(key=lambda p: (-p.count(b"/"), p))
    for i, path in enumerate(entries):
        ns = MTIME_NS + i * 1_000_003_007
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    os.utime(j(top, b"empty"), ns=(0, 0))
    os.utime(j(top, b"setuid"), ns=(2**33 * 10**9 + 1, 2**33 * 10**9 + 1))
    os.utime(top, ns=(MTIME_NS, MTIME_NS))


def count_entries(root: str | os.PathLike[str]) -> int:
    """Entries below `root`, root included (what a full-featured archive holds)."""
    return 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))
