"""Write a decoded catar archive into a directory (untar, and `extract` of a .caidx).

Items come from `ArchiveDecoder` in archive order. Every write goes through a
file descriptor of the directory it happens in, opened with O_NOFOLLOW |
O_DIRECTORY, so nothing is ever written outside the target and no symlink —
from the archive or already in the target — is followed:

* a directory is created (mode 0700, user-writable) when its entry arrives and
  receives its final owner, xattrs, ACLs, mode, times and chattr flags at its
  DirectoryEnd, after its contents: read-only trees extract, and the times
  written are not disturbed by the children;
* every other node is created under a temporary name in its directory, gets its
  metadata, and is renamed into place (a failure leaves no partial file behind);
  chattr flags such as immutable/append-only come last, after the rename;
* in a directory that existed before, those renames (and new subdirectories, built
  under temporary names) wait for the directory's end, when the decoder has checked
  its goodbye table: a bad archive leaves such a directory as it was. A new target
  is built beside its name and renamed at the very end;
* at most OPEN_DIRECTORIES directory descriptors are open whatever the depth: a
  shallower one is closed and reopened through ".." (checked by device and inode).

The order of the metadata steps follows casync (cadecoder.c): owner first (it
clears setuid bits and file capabilities), xattrs, capabilities and the SELinux
label, then the mode, then ACLs (built from the mode and the ACL records), then
times, then the chattr flags. A few chattr flags (noatime, compression, nocow,
projinherit) and the quota project id go on the still-empty node, as casync does.

What cannot be restored (chown as non-root, xattrs or chattr flags the target
filesystem lacks, device nodes as non-root, an existing entry in the way) raises
`ExtractError` naming the path; with `best_effort` each becomes a warning in
`TreeExtractor.warnings` and extraction goes on. `same_owner=False` and
`same_permissions=False` are desync's --no-same-owner / --no-same-permissions:
those restores are skipped silently.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from ..errors import PydesyncError, shown_path
from ..fsutil import OPEN_DIRECTORIES, TreeMoved, identity, remove_tree, reopen_parent
from ..platform import (
    BTRFS_SUPER_MAGIC,
    FUSE_SUPER_MAGIC,
    MSDOS_SUPER_MAGIC,
    create_btrfs_subvolume,
    fs_magic,
    make_subvolume_read_only,
    read_chattr,
    rename_noreplace,
    write_chattr,
    write_fat_attributes,
    write_projid,
)
from . import format as F
from .decoder import AclEntry, ArchiveDecoder, DirectoryEnd, Node, Readable
from .filewriter import BatchWriter, WriteFailed, max_deferred
from .fsmeta import ACL_XATTR_ACCESS, ACL_XATTR_DEFAULT, PosixAcl, gid_of, uid_of

# chattr flags casync applies on the empty node, before any content (cadecoder.c APPLY_EARLY_FS_FL)
FS_NOATIME_FL, FS_COMPR_FL, FS_NOCOW_FL = 0x80, 0x4, 0x800000
FS_NOCOMP_FL, FS_PROJINHERIT_FL = 0x400, 0x20000000
# Flags ext4/xfs/btrfs copy from a directory to new entries in it.
INHERITED_CHATTR = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x400 | 0x4000 | 0x8000 | 0x10000 | 0x800000 \
    | 0x20000000 | 0x40000000
EARLY_CHATTR = FS_NOATIME_FL | FS_COMPR_FL | FS_NOCOW_FL | FS_NOCOMP_FL | FS_PROJINHERIT_FL
TIME_FLAGS = F.WITH_NSEC_TIME | F.WITH_USEC_TIME | F.WITH_SEC_TIME | F.WITH_2SEC_TIME
PLAIN_LIMIT = 8 << 20  # files up to this size may take the one-call native path
ID_FLAGS = F.WITH_16BIT_UIDS | F.WITH_32BIT_UIDS | F.WITH_USER_NAMES
DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ROOT_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the target itself may be a symlink
WRITE_BLOCK = 1 << 20
# xattr namespaces an archive can carry (others are left alone on existing nodes)
STORED_XATTR_PREFIXES = ("user.", "trusted.")


class ExtractError(PydesyncError):
    """Something in the archive cannot be written to the target."""


@dataclass
class ExtractOptions:
    """How to restore: see the module docstring."""

    overwrite: bool = False
    best_effort: bool = False
    same_owner: bool = True
    same_permissions: bool = True


class _Where:
    """Where a node is restored, as a message shows it: made only when a message needs it, so a
    tree of any depth keeps no path per level."""

    __slots__ = ("node", "root")

    def __init__(self, root: bytes, node: Node):
        self.root = root
        self.node = node

    def __str__(self) -> str:
        path = self.node.path
        return shown_path((self.root.rstrip(b"/") + b"/" + path if path else self.root) or b"/")


@dataclass
class _Release:
    """A directory descriptor to close once the files queued in it are written (a deep walk keeps
    only the deepest OPEN_DIRECTORIES open)."""

    fd: int | None


@dataclass
class _Pending:
    """An entry finished under its temporary name in a directory that existed before, waiting for
    that directory's end (its goodbye table checked) to take its real name."""

    temp: bytes
    node: Node
    display: _Where
    is_dir: bool
    may_inherit_flags: bool


@dataclass
class _Dir:
    """A directory being filled; fd None and not `released` = skipped (its subtree is ignored)."""

    node: Node
    fd: int | None
    display: _Where
    created: bool = True
    released: bool = False  # closed while deeper directories are filled; reopened through ".."
    identity: tuple[int, int] | None = None  # (st_dev, st_ino), to check a reopened descriptor
    disk_name: bytes | None = None  # its name in its parent while it is being filled
    pending: list[_Pending] = field(default_factory=list)  # existing directories: what waits for the end
    times: tuple[int, int] | None = None  # an existing directory's (atime, mtime), put back after a failure
    late_attributes: bool = True  # False: a new directory whose chattr flags wait for its rename
    restore_mode: int | None = None  # mode to put back on a merged directory we had to make writable
    _default_acl: bool | None = None
    _inheritable: bool | None = None

    def passes_on_flags(self) -> bool:
        """Whether new entries here may inherit chattr flags (checked once per directory)."""
        if self._inheritable is None:
            try:
                self._inheritable = self.fd is None or bool(read_chattr(self.fd) & INHERITED_CHATTR)
            except OSError:
                self._inheritable = True
        return self._inheritable

    def has_default_acl(self) -> bool:
        """Whether new entries here inherit an ACL (checked once per directory)."""
        if self._default_acl is None:
            try:
                self._default_acl = self.fd is not None and bool(os.getxattr(self.fd, ACL_XATTR_DEFAULT))
            except OSError:
                self._default_acl = False
        return self._default_acl


@dataclass
class _Target:
    """The node being restored: by its own fd (regular files, directories) or by name in dir_fd."""

    node: Node
    display: _Where
    dir_fd: int | None
    name: bytes | None
    fd: int | None = None
    created: bool = True
    restore_mode: int | None = None
    fresh: bool = True  # created by us just now: nothing stale to remove
    may_inherit_acl: bool = True  # its directory has a default ACL, so a fresh node may carry one
    may_inherit_flags: bool = True  # its directory has inheritable chattr flags
    st: os.stat_result | None = field(default=None, repr=False)

    @property
    def proc_path(self) -> str:
        """A path for xattr calls on a node without an fd (the last component is never followed)."""
        assert self.dir_fd is not None and self.name is not None
        return f"/proc/self/fd/{self.dir_fd}/{os.fsdecode(self.name)}"

    @property
    def entry(self) -> bytes:
        """The node's name in dir_fd (for calls on a node without an fd of its own)."""
        assert self.name is not None
        return self.name

    def stat(self) -> os.stat_result:
        if self.fd is not None:
            self.st = os.fstat(self.fd)
        else:
            self.st = os.lstat(self.entry, dir_fd=self.dir_fd)
        return self.st

    def chown(self, uid: int, gid: int) -> None:
        if self.fd is not None:
            os.fchown(self.fd, uid, gid)
        else:
            os.chown(self.entry, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        """(Never called for symlinks.)"""
        if self.fd is not None:
            os.fchmod(self.fd, mode)
            return
        try:
            os.chmod(self.entry, mode, dir_fd=self.dir_fd, follow_symlinks=False)
        except NotImplementedError:  # a libc without fchmodat(AT_SYMLINK_NOFOLLOW): go through O_PATH
            fd = os.open(self.entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
            try:
                os.chmod(f"/proc/self/fd/{fd}", mode)
            finally:
                os.close(fd)

    def utime(self, atime: int, mtime: int) -> None:
        if self.fd is not None:
            os.utime(self.fd, ns=(atime, mtime))
        else:
            os.utime(self.entry, ns=(atime, mtime), dir_fd=self.dir_fd, follow_symlinks=False)

    def setxattr(self, name: str | bytes, value: bytes) -> None:
        if self.fd is not None:
            os.setxattr(self.fd, name, value)
        else:
            os.setxattr(self.proc_path, name, value, follow_symlinks=False)

    def getxattr(self, name: str) -> bytes | None:
        try:
            if self.fd is not None:
                return os.getxattr(self.fd, name)
            return os.getxattr(self.proc_path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
                return None
            raise

    def removexattr(self, name: str) -> None:
        try:
            if self.fd is not None:
                os.removexattr(self.fd, name)
            else:
                os.removexattr(self.proc_path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise

    def listxattr(self) -> list[str]:
        try:
            if self.fd is not None:
                return os.listxattr(self.fd)
            return os.listxattr(self.proc_path, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                return []
            raise


def _remove_quietly(dir_fd: int, name: bytes, is_dir: bool) -> None:
    """Remove a temporary entry after a failure (gone already is fine)."""
    with contextlib.suppress(OSError):
        if is_dir:
            remove_tree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)


def _missing_ancestors(path: bytes) -> list[bytes]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=256)
def _chattr_bits(ca_flags: int) -> int:
    """casync WITH_FLAG_* bits -> Linux FS_*_FL bits."""
    return sum(fs for fs, ca in F.CHATTR_TO_FLAG.items() if ca_flags & ca)


@functools.lru_cache(maxsize=256)
def _fat_bits(ca_flags: int) -> int:
    return sum(fat for fat, ca in F.FAT_TO_FLAG.items() if ca_flags & ca)


def _parse_id(name: bytes) -> int | None:
    """A numeric user/group name ("1000") is taken as the number, as casync does."""
    if name.isdigit() and len(name) < 11:
        value = int(name)
        if value < 2**32 - 1:
            return value
    return None


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)


class TreeExtractor:
    """Restore archive items (`Node`/`DirectoryEnd`, as the decoder yields them) under `target`."""

    def __init__(self, target: str | bytes | os.PathLike[str], options: ExtractOptions | None = None,
                 warn: Callable[[str], None] | None = None):
        self.target = os.fsencode(target)
        self.options = options or ExtractOptions()
        self.warnings: list[str] = []
        self._warn = warn
        self._stack: list[_Dir] = []
        self._root = os.geteuid() == 0
        self._ids = (os.geteuid(), os.getegid())
        self._owner_cache: dict[tuple, tuple[int | None, int | None]] = {}
        self._temp_counter = itertools.count()
        # Temporary names: a prefix drawn per extraction, which no archive (made before it) can
        # name, and O_EXCL creation, which never replaces what is there
        self._temp_prefix = b".#pydesync.%s." % secrets.token_hex(8).encode()
        self._umask = current_umask()
        self._magic: dict[int, int] = {}
        self._writer: BatchWriter[_Dir | _Release, Node] = BatchWriter(self._finish_directory, self._umask)
        self._staging: bytes | None = None  # a new target is built here, a sibling, and renamed at the end
        self._made_parents: list[bytes] = []  # directories made to hold a new target, deepest first

    # ---- driving -----------------------------------------------------------------------------
    def extract(self, items: Iterable[Node | DirectoryEnd]) -> list[str]:
        """Write every item; returns the warnings (best_effort). Raises ExtractError/ArchiveError.
        A target that did not exist is built under a temporary sibling and renamed into place at
        the end, so a failure leaves no target at all."""
        try:
            self._extract(items)
        except BaseException:
            self._discard_staging()
            raise
        if self._staging is not None:
            self._commit_staging()
        return self.warnings

    def _extract(self, items: Iterable[Node | DirectoryEnd]) -> None:
        writer: BatchWriter[_Dir | _Release, Node] = BatchWriter(self._finish_directory, self._umask,
                                                                 max_deferred(OPEN_DIRECTORIES))
        self._writer = writer
        try:
            for item in items:
                if isinstance(item, DirectoryEnd):
                    self._end_directory(item.node)
                elif not self._stack:
                    self._open_root(item)
                else:
                    self._child(item)
            writer.flush()
        except WriteFailed as e:
            raise ExtractError(f"cannot create {self._display(cast(Node, e.label))}: "
                               f"{_strerror(e.error)}") from None  # (the labels given to add are nodes)
        finally:
            # the writer thread may still use these descriptors: stop it first
            left = writer.abandon()
            self._undo_pending()
            for deferred in left:  # existing directories whose end came: their own metadata, as promised
                if isinstance(deferred, _Dir) and not deferred.created and deferred.fd is not None:
                    with contextlib.suppress(Exception):
                        self._finish_directory(deferred)
            for frame in left + self._stack[::-1]:
                if frame.fd is not None:
                    os.close(frame.fd)
            self._stack.clear()

    def _undo_pending(self) -> None:
        """After a failure: remove what waited in existing directories for their end, and give
        them back the mode we changed, so each is as it was. Released directories are reopened
        by name from the root down (two descriptors at a time)."""
        parent_fd: int | None = None
        reopened: int | None = None  # the last descriptor opened here, closed one level further
        for depth, frame in enumerate(self._stack):
            fd, ours = frame.fd, False
            if fd is None and frame.released:
                with contextlib.suppress(OSError):
                    fd = self._reopen_by_name(frame, depth, parent_fd)
                    ours = fd is not None
            if fd is not None:
                self._remove_pending(frame, fd)
            frame.pending.clear()
            if reopened is not None:
                os.close(reopened)
            reopened = fd if ours else None
            parent_fd = fd
        if reopened is not None:
            os.close(reopened)

    @staticmethod
    def _remove_pending(frame: _Dir, fd: int) -> None:
        """An unfinished directory as it was: no temporary entries, its mode and times back."""
        for entry in frame.pending:
            _remove_quietly(fd, entry.temp, entry.is_dir)
        if frame.restore_mode is not None:
            with contextlib.suppress(OSError):
                os.fchmod(fd, frame.restore_mode)
        if frame.times is not None:
            with contextlib.suppress(OSError):
                os.utime(fd, ns=frame.times)

    def _reopen_by_name(self, frame: _Dir, depth: int, parent_fd: int | None) -> int | None:
        if depth == 0:  # (opened as _open_root opens it: a target given as a symlink is followed)
            fd = os.open(self._staging or self.target, ROOT_OPEN)
        elif parent_fd is None or frame.disk_name is None:
            return None
        else:
            fd = os.open(frame.disk_name, DIR_OPEN, dir_fd=parent_fd)
        if identity(fd) != frame.identity:
            os.close(fd)
            return None
        return fd

    def _commit_staging(self) -> None:
        """Rename the finished tree over the empty directory that held the target's name."""
        staging, self._staging = self._staging, None
        try:
            os.rename(staging, self.target.rstrip(b"/"))  # type: ignore[arg-type]  # (set while staging)
        except OSError as e:
            self._staging = staging
            self._discard_staging()
            what = "something was written into it meanwhile" if e.errno in (errno.ENOTEMPTY, errno.EEXIST) \
                else _strerror(e)
            raise ExtractError(f"cannot put the extracted tree in place at {os.fsdecode(self.target)}: "
                               f"{what}") from None

    def _discard_staging(self) -> None:
        """After a failure: remove the partial tree and the placeholder (best effort)."""
        staging, self._staging = self._staging, None
        if staging is None:
            return
        with contextlib.suppress(OSError):
            remove_tree(staging)
        for folder in [self.target.rstrip(b"/"), *self._made_parents]:  # (parents: if still empty)
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def _display(self, node: Node) -> _Where:
        return _Where(self.target, node)

    def _problem(self, display: _Where, what: str, error: OSError | str | None = None) -> None:
        """Something could not be restored: an error, or a warning with best_effort."""
        reason = _strerror(error) if isinstance(error, OSError) else error
        message = f"{display}: {what}" + (f": {reason}" if reason else "")
        if not self.options.best_effort:
            raise ExtractError(message)
        self.warnings.append(message)
        if self._warn is not None:
            self._warn(message)

    # ---- directories -------------------------------------------------------------------------
    def _open_root(self, node: Node) -> None:
        display = self._display(node)
        if not node.is_dir or node.path:
            raise ExtractError(f"{display}: the archive's root is not a directory")
        created = False
        try:
            parent = os.path.dirname(self.target.rstrip(b"/"))
            if parent:
                self._made_parents = _missing_ancestors(parent)
                os.makedirs(parent, exist_ok=True)
            os.mkdir(self.target, 0o700)  # holds the name until the tree built beside it replaces it
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise ExtractError(f"cannot create {display}: {_strerror(e)}") from None
        root = self.target
        if created:
            base = os.path.basename(self.target.rstrip(b"/"))[:200]  # the sibling's name fits NAME_MAX
            staging = os.path.join(os.path.dirname(self.target.rstrip(b"/")) or b".",
                                   b".%s.pydesync-%s" % (base, secrets.token_hex(6).encode()))
            try:
                os.mkdir(staging, 0o700)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.rmdir(self.target)
                raise ExtractError(f"cannot create {os.fsdecode(staging)}: {_strerror(e)}") from None
            self._staging = root = staging
        try:
            fd = os.open(root, ROOT_OPEN)
        except OSError as e:
            what = "is not a directory" if e.errno == errno.ENOTDIR else _strerror(e)
            raise ExtractError(f"cannot extract into {display}: {what}") from None
        frame = _Dir(node, fd, display, created)
        self._stack.append(frame)
        if not created:
            self._make_writable(frame)
        else:
            self._early_attributes(_Target(node, display, None, None, fd))

    def _make_writable(self, frame: _Dir) -> None:
        """Let us add entries to an existing directory: note its times and the mode to put back
        (after a failure, or at its end), and add the write bits we need."""
        assert frame.fd is not None
        st = os.fstat(frame.fd)
        frame.times = (st.st_atime_ns, st.st_mtime_ns)
        if self._root or st.st_mode & 0o300 == 0o300 or st.st_uid != os.geteuid():
            return
        os.fchmod(frame.fd, stat.S_IMODE(st.st_mode) | 0o700)
        frame.restore_mode = stat.S_IMODE(st.st_mode)

    def _check_name(self, node: Node) -> None:
        name = node.name
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise ExtractError(f"{self._display(node)}: invalid file name {name!r} in the archive")

    def _child(self, node: Node) -> None:
        parent = self._stack[-1]
        if parent.fd is not None and self._plain(node, parent):  # the common case: no display name
            self._check_name(node)
            self._write_plain(parent.fd, node)
            return
        display = self._display(node)
        if parent.fd is None:  # inside a skipped directory
            if node.is_dir:
                self._stack.append(_Dir(node, None, display))
            return
        self._check_name(node)
        if node.is_dir:
            if parent.created:
                self._stack.append(self._make_directory(parent.fd, node, display))
            else:
                self._stack.append(self._enter_in_existing(parent, node, display))
            self._bound_descriptors()
        else:
            self._make_leaf(parent.fd, node, display, parent.has_default_acl(), parent.passes_on_flags(),
                            pending=None if parent.created else parent.pending)

    # ---- the common case in one native call ----------------------------------------------------
    def _plain(self, node: Node, parent: _Dir) -> bool:
        """A small regular file in a directory we created, whose only metadata is mode and mtime
        (no xattrs, ACLs, capabilities, label, project id or flags, and our own owner)."""
        if not node.is_file or not parent.created or (node.size or 0) > PLAIN_LIMIT:
            return False
        flags = node.feature_flags
        if (node.xattrs and flags & F.WITH_XATTRS) or (node.fcaps is not None and flags & F.WITH_FCAPS) \
                or (node.selinux is not None and flags & F.WITH_SELINUX) or node.flags & flags \
                or (node.quota_projid and flags & F.WITH_QUOTA_PROJID):
            return False
        if flags & F.WITH_ACL and (node.acl_users or node.acl_groups or node.acl_group_obj is not None):
            return False
        if parent.has_default_acl() or parent.passes_on_flags():
            return False
        if self.options.same_owner and flags & ID_FLAGS:
            key = (node.user, node.group, node.uid, node.gid, flags & ID_FLAGS)
            owner = self._owner_cache.get(key)
            if owner is None:
                numbers = bool(flags & (F.WITH_16BIT_UIDS | F.WITH_32BIT_UIDS))
                names = flags & F.WITH_USER_NAMES
                uid, _ = self._resolve(node.user if names else None, node.uid, numbers, True)
                gid, _ = self._resolve(node.group if names else None, node.gid, numbers, False)
                owner = self._owner_cache[key] = (uid, gid)
            if owner != self._ids:
                return False
        return True

    def _write_plain(self, dir_fd: int, node: Node) -> None:
        flags = node.feature_flags
        default = 0o666 & ~self._umask
        if not self.options.same_permissions:
            mode = default
        elif flags & (F.WITH_PERMISSIONS | F.WITH_ACL):
            mode = node.mode & 0o7777
        elif flags & F.WITH_READ_ONLY:
            mode = default | 0o200 if node.mode & 0o222 else default & ~0o222
        else:
            mode = default
        temp = self._temp_prefix + b"%d" % next(self._temp_counter)
        mtime = node.mtime if flags & TIME_FLAGS else -1
        self._writer.add(dir_fd, temp, node.name, node.read_payload(), mode, mtime, node)

    def _bound_descriptors(self) -> None:
        """Keep the deepest OPEN_DIRECTORIES directories open, whatever the depth: a shallower one
        is closed once the files queued in it are written, and reopened through ".." when the walk
        comes back up to it."""
        stack = self._stack
        if len(stack) > OPEN_DIRECTORIES:
            far = stack[-OPEN_DIRECTORIES - 1]
            if far.fd is not None:
                far.identity = identity(far.fd)
                self._writer.defer(_Release(far.fd))
                far.fd, far.released = None, True

    def _reopen(self, frame: _Dir, child: _Dir) -> None:
        """Open a released directory again from the child just finished, checking it is the same."""
        assert child.fd is not None and frame.identity is not None
        try:
            frame.fd = reopen_parent(child.fd, frame.identity)
        except TreeMoved:
            raise ExtractError(f"{frame.display}: moved while the archive was extracted into it") from None
        except OSError as e:
            raise ExtractError(f"cannot return to {frame.display}: {_strerror(e)}") from None
        frame.released = False

    def _enter_in_existing(self, parent: _Dir, node: Node, display: _Where) -> _Dir:
        """A directory inside one that existed: merged in place if it is a directory already,
        otherwise built under a temporary name that takes the real one at the parent's end."""
        assert parent.fd is not None
        try:
            st: os.stat_result | None = os.lstat(node.name, dir_fd=parent.fd)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise ExtractError(f"cannot access {display}: {_strerror(e)}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            return self._make_directory(parent.fd, node, display)
        if st is not None and not self.options.overwrite:
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            self._problem(display, f"already exists and is {what} (--overwrite=false keeps it)")
            return _Dir(node, None, display)
        temp = self._temp_prefix + b"%d" % next(self._temp_counter)
        entry = _Pending(temp, node, display, True, parent.passes_on_flags())
        parent.pending.append(entry)  # (from now on: a failure removes it, made or half made)
        frame = self._make_directory(parent.fd, node, display, temp)
        if frame.fd is None:  # could not be made (best_effort): nothing of it stays
            parent.pending.remove(entry)
            _remove_quietly(parent.fd, temp, True)
        frame.late_attributes = False
        return frame

    def _make_directory(self, dir_fd: int, node: Node, display: _Where, temp: bytes | None = None) -> _Dir:
        """Create (or merge into) the directory `node`, as `temp` if given; its frame, opened."""
        name = temp or node.name
        created = False
        try:
            created = self._mkdir(dir_fd, node, display, name)
        except FileExistsError:
            st = os.lstat(name, dir_fd=dir_fd)
            if not stat.S_ISDIR(st.st_mode):  # a symlink included: replaced itself, never followed
                if not self.options.overwrite:
                    what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    self._problem(display, f"already exists and is {what} (--overwrite=false keeps it)")
                    return _Dir(node, None, display)
                try:
                    os.unlink(name, dir_fd=dir_fd)
                    created = self._mkdir(dir_fd, node, display, name)
                except OSError as e:
                    raise ExtractError(f"cannot replace {display}: {_strerror(e)}") from None
        except OSError as e:
            raise ExtractError(f"cannot create directory {display}: {_strerror(e)}") from None
        try:
            fd = os.open(name, DIR_OPEN, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                self._problem(display, "refusing to follow a symlink in place of a directory")
                return _Dir(node, None, display)
            raise ExtractError(f"cannot open directory {display}: {_strerror(e)}") from None
        frame = _Dir(node, fd, display, created, disk_name=name)
        if not created:  # (its chattr flags wait for its end with the rest of its metadata)
            self._make_writable(frame)
            return frame
        try:
            self._early_attributes(_Target(node, display, dir_fd, name, fd, created=created))
        except BaseException:
            os.close(fd)
            raise
        return frame

    def _mkdir(self, dir_fd: int, node: Node, display: _Where, name: bytes) -> bool:
        """Create a directory (a btrfs subvolume if the archive says so and we can); True if created."""
        if node.flags & node.feature_flags & F.WITH_SUBVOLUME:
            if self._fs_magic(dir_fd) == BTRFS_SUPER_MAGIC and len(name) < 4088:
                try:
                    create_btrfs_subvolume(dir_fd, name)
                    return True
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        raise FileExistsError(e.errno, e.strerror) from None
                    self._problem(display, "cannot create a btrfs subvolume (made a plain directory)", e)
            else:
                self._problem(display, "cannot create a btrfs subvolume here (made a plain directory)")
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        return True

    def _end_directory(self, node: Node) -> None:
        if not self._stack or self._stack[-1].node is not node:
            raise ExtractError(f"{self._display(node)}: directory end out of order")
        frame = self._stack[-1]
        if frame.pending:  # (on the stack still: a failure here removes what is left of them)
            self._install_pending(frame)
        self._stack.pop()
        if self._stack and self._stack[-1].released:
            self._reopen(self._stack[-1], frame)
        if frame.fd is not None:
            self._writer.defer(frame)  # after the files queued in it are written

    def _install_pending(self, frame: _Dir) -> None:
        """An existing directory's end, its goodbye table checked: what was made under temporary
        names in it takes the real names now (new directories once their contents are written),
        all or nothing: what they replace is moved aside first, and back if one rename fails."""
        fd = frame.fd
        assert fd is not None
        if any(entry.is_dir for entry in frame.pending):
            self._writer.flush()
        done: list[tuple[_Pending, bytes | None]] = []  # installed, with what each moved aside
        try:
            for entry in frame.pending:
                installed, aside = self._install_entry(fd, entry)
                if installed:
                    done.append((entry, aside))
        except BaseException:
            for entry, aside in reversed(done):
                with contextlib.suppress(OSError):
                    os.rename(entry.node.name, entry.temp, src_dir_fd=fd, dst_dir_fd=fd)
                    if aside is not None:
                        os.rename(aside, entry.node.name, src_dir_fd=fd, dst_dir_fd=fd)
            raise
        frame.pending = []
        for entry, aside in done:
            if aside is not None:
                self._remove_replaced(fd, entry, aside)
        for entry, _ in done:
            if self._needs_late_attributes(entry):
                self._late_attributes_by_name(fd, entry)

    def _install_entry(self, fd: int, entry: _Pending) -> tuple[bool, bytes | None]:
        """Rename one entry into place, moving what is there aside first; (installed, aside)."""
        name = entry.node.name
        try:
            os.lstat(name, dir_fd=fd)
            present = True
        except FileNotFoundError:
            present = False
        aside = None
        try:
            if present:
                if not self.options.overwrite:
                    raise FileExistsError(errno.EEXIST, "exists")
                aside = self._temp_prefix + b"%d" % next(self._temp_counter)
                os.rename(name, aside, src_dir_fd=fd, dst_dir_fd=fd)
            try:
                rename_noreplace(fd, entry.temp, name)
            except BaseException:
                if aside is not None:
                    os.rename(aside, name, src_dir_fd=fd, dst_dir_fd=fd)
                raise
        except FileExistsError:
            self._problem(entry.display, "already exists (--overwrite=false keeps it)")
        except OSError as e:
            self._problem(entry.display, "cannot move the new file into place", e)
        else:
            return True, aside
        _remove_quietly(fd, entry.temp, entry.is_dir)  # (best_effort: skipped)
        return False, None

    def _remove_replaced(self, fd: int, entry: _Pending, aside: bytes) -> None:
        """Remove what an entry replaced (moved aside under a temporary name)."""
        try:
            if stat.S_ISDIR(os.lstat(aside, dir_fd=fd).st_mode):
                remove_tree(aside, dir_fd=fd)
            else:
                os.unlink(aside, dir_fd=fd)
        except OSError as e:
            self._problem(entry.display, f"replaced, but what was there cannot be removed (it is left as "
                                         f"{os.fsdecode(aside)})", e)

    def _finish_directory(self, frame: _Dir | _Release) -> None:
        """A directory's own metadata, once everything inside it exists; closes its descriptor."""
        if isinstance(frame, _Release):
            fd, frame.fd = frame.fd, None
            if fd is not None:
                os.close(fd)
            return
        node = frame.node
        try:
            target = _Target(node, frame.display, None, None, frame.fd, created=frame.created,
                             restore_mode=frame.restore_mode, fresh=frame.created)
            if not frame.created:
                self._early_attributes(target)
            self._metadata(target)
            if frame.late_attributes:  # (a directory made immutable could not be renamed)
                self._late_attributes(target)
        finally:
            fd, frame.fd = frame.fd, None
            if fd is not None:
                os.close(fd)

    # ---- everything but directories -----------------------------------------------------------
    def _make_leaf(self, dir_fd: int, node: Node, display: _Where, may_inherit_acl: bool = True,
                   may_inherit_flags: bool = True, pending: list[_Pending] | None = None) -> None:
        """Create a non-directory node under a temporary name, then move it into place.

        Without `pending` the directory was created by this extraction (mode 0700, names
        unique in the archive), so nothing can be in the way of the final name. With it,
        the directory existed: the node waits there, whole, for the directory's end.
        """
        name = node.name
        existing: os.stat_result | None = None
        if pending is not None:
            try:
                existing = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                existing = None
            except OSError as e:
                raise ExtractError(f"cannot access {display}: {_strerror(e)}") from None
        if existing is not None and not self.options.overwrite:
            self._problem(display, "already exists (--overwrite=false keeps it)")
            return
        temp = self._temp_prefix + b"%d" % next(self._temp_counter)
        target = _Target(node, display, dir_fd, temp, may_inherit_acl=may_inherit_acl,
                         may_inherit_flags=may_inherit_flags)
        discard = True  # the temporary node may exist and must go if we do not finish
        try:
            if not self._create(target):
                return
            self._metadata(target)
            if pending is not None:
                pending.append(_Pending(temp, node, display, False, may_inherit_flags))
                discard = False
                return
            installed = self._install(dir_fd, temp, name, display)
            discard = False
            if installed:
                target.name = name
                self._late_attributes(target)
        finally:
            if target.fd is not None:
                os.close(target.fd)
            if discard:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)

    def _create(self, target: _Target) -> bool:
        """Create the node under its temporary name; False if it could not be (best_effort)."""
        node, dir_fd, temp = target.node, target.dir_fd, target.name
        assert temp is not None  # (a target being created has its temporary name)
        mode = node.mode
        try:
            if stat.S_ISREG(mode):
                target.fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                                    | os.O_NOCTTY, 0o600, dir_fd=dir_fd)
            elif stat.S_ISLNK(mode):
                assert node.target is not None
                os.symlink(node.target, temp, dir_fd=dir_fd)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(temp, 0o600, dir_fd=dir_fd)
            elif stat.S_ISSOCK(mode):
                os.mknod(temp, stat.S_IFSOCK | 0o600, dir_fd=dir_fd)
            else:
                assert node.rdev is not None
                os.mknod(temp, stat.S_IFMT(mode) | 0o600, os.makedev(*node.rdev), dir_fd=dir_fd)
        except OSError as e:
            if stat.S_ISREG(mode):
                raise ExtractError(f"cannot create {target.display}: {_strerror(e)}") from None
            kind = ("symlink" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode)
                    else "socket" if stat.S_ISSOCK(mode) else "device node")
            self._problem(target.display, f"cannot create {kind}", e)
            return False
        if target.fd is not None:
            self._early_attributes(target)
            try:
                for block in target.node.payload(WRITE_BLOCK):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(target.fd, view):]
            except OSError as e:
                raise ExtractError(f"cannot write {target.display}: {_strerror(e)}") from None
        return True

    def _install(self, dir_fd: int, temp: bytes, name: bytes, display: _Where) -> bool:
        """Rename a finished node into place in a directory of ours (nothing can be in the way);
        False if that failed (best_effort)."""
        try:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return True
        except OSError as e:
            self._problem(display, "cannot move the new file into place", e)
        _remove_quietly(dir_fd, temp, False)
        return False

    @staticmethod
    def _needs_late_attributes(entry: _Pending) -> bool:
        """Whether a node installed late has chattr flags, FAT attributes or a read-only subvolume
        to receive (then it is opened again by name)."""
        node = entry.node
        flags = node.feature_flags
        if not (node.is_dir or node.is_file):
            return False
        if node.flags & flags:
            return True
        return entry.may_inherit_flags and bool(flags & F.WITH_CHATTR)

    def _late_attributes_by_name(self, dir_fd: int, entry: _Pending) -> None:
        node = entry.node
        extra = os.O_DIRECTORY if node.is_dir else os.O_NOCTTY
        try:
            fd = os.open(node.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | extra, dir_fd=dir_fd)
        except OSError as e:
            self._problem(entry.display, "cannot open it again to set its file attributes", e)
            return
        try:
            self._late_attributes(_Target(node, entry.display, dir_fd, node.name, fd,
                                          may_inherit_flags=entry.may_inherit_flags))
        finally:
            os.close(fd)

    # ---- metadata ----------------------------------------------------------------------------
    def _fs_magic(self, fd: int) -> int:
        dev = os.fstat(fd).st_dev
        if dev not in self._magic:
            self._magic[dev] = fs_magic(fd)
        return self._magic[dev]

    def _early_attributes(self, target: _Target) -> None:
        """chattr flags that belong on the empty node, and the quota project id (casync order)."""
        node, fd = target.node, target.fd
        if fd is None:
            return
        flags = node.feature_flags
        mask = _chattr_bits(flags & F.WITH_CHATTR) & EARLY_CHATTR
        value = _chattr_bits(node.flags & flags)
        if not value and not target.may_inherit_flags:
            mask = 0
        if mask:
            try:
                write_chattr(fd, value, mask)
            except OSError as e:
                self._problem(target.display, f"cannot set file attributes (chattr {value & mask:#x})", e)
        if flags & F.WITH_QUOTA_PROJID and node.quota_projid:
            try:
                write_projid(fd, node.quota_projid)
            except OSError as e:
                self._problem(target.display, f"cannot set quota project id {node.quota_projid}", e)

    def _late_attributes(self, target: _Target) -> None:
        """All chattr flags (immutable/append-only included), FAT attributes, btrfs read-only."""
        node, fd = target.node, target.fd
        if fd is None or not (node.is_dir or node.is_file):
            return
        flags = node.feature_flags
        mask = _chattr_bits(flags & F.WITH_CHATTR)
        value = _chattr_bits(node.flags & flags)
        if not value and not target.may_inherit_flags:
            mask = 0  # a fresh node in a directory without inheritable flags has none to clear
        if mask:
            try:
                write_chattr(fd, value, mask)
            except OSError as e:
                self._problem(target.display, f"cannot set file attributes (chattr {value & mask:#x})", e)
        fat_value = _fat_bits(node.flags & flags)
        if fat_value:
            self._set_fat_attributes(target, fat_value, _fat_bits(flags))
        if node.is_dir and node.flags & flags & F.WITH_SUBVOLUME_RO:
            try:
                make_subvolume_read_only(fd)
            except OSError as e:
                self._problem(target.display, "cannot make the btrfs subvolume read-only", e)

    def _set_fat_attributes(self, target: _Target, value: int, mask: int) -> None:
        assert target.fd is not None
        if self._fs_magic(target.fd) not in (MSDOS_SUPER_MAGIC, FUSE_SUPER_MAGIC):
            self._problem(target.display, "cannot set FAT attributes", "not a FAT filesystem")
            return
        try:
            write_fat_attributes(target.fd, value, mask)
        except OSError as e:
            self._problem(target.display, "cannot set FAT attributes", e)

    def _metadata(self, target: _Target) -> None:
        """Owner, xattrs, capabilities, SELinux label, mode, ACLs, times — in that order."""
        node = target.node
        flags = node.feature_flags
        target.stat()
        if self.options.same_owner and flags & ID_FLAGS:
            self._owner(target)
        if flags & F.WITH_XATTRS:
            self._xattrs(target)
        if flags & F.WITH_FCAPS and node.is_file and node.fcaps is not None:
            try:
                target.setxattr("security.capability", node.fcaps)
            except OSError as e:
                self._problem(target.display, "cannot set file capabilities", e)
        if flags & F.WITH_SELINUX and node.selinux is not None:
            try:
                target.setxattr("security.selinux", node.selinux + b"\0")
            except OSError as e:
                self._problem(target.display, f"cannot set SELinux label {os.fsdecode(node.selinux)}", e)
        mode = self._final_mode(target)
        if mode is not None and not node.is_symlink and stat.S_IMODE(target.st.st_mode) != mode:  # type: ignore[union-attr]  # (stat() ran when the node was made)
            try:
                target.chmod(mode)
            except OSError as e:
                self._problem(target.display, f"cannot set mode {mode:04o}", e)
        if flags & F.WITH_ACL and self.options.same_permissions and not node.is_symlink:
            self._acls(target)
        if flags & TIME_FLAGS:
            try:
                atime = (target.st or target.stat()).st_atime_ns  # writing does not change atime
                target.utime(atime, node.mtime)
            except OSError as e:
                self._problem(target.display, "cannot set the modification time", e)

    def _resolve(self, name: bytes | None, number: int, has_numbers: bool,
                 user: bool) -> tuple[int | None, str]:
        """An id from a USER/GROUP (or ACL) name, falling back to the stored number."""
        if name is not None:
            parsed = _parse_id(name)
            if parsed is not None:
                return parsed, ""
            found = (uid_of if user else gid_of)(os.fsdecode(name))
            if found is not None:
                return found, ""
            if not has_numbers:
                return None, f"unknown {'user' if user else 'group'} {os.fsdecode(name)!r}"
        return number, ""

    def _owner(self, target: _Target) -> None:
        node = target.node
        flags = node.feature_flags
        names = flags & F.WITH_USER_NAMES
        numbers = bool(flags & (F.WITH_16BIT_UIDS | F.WITH_32BIT_UIDS))
        uid, why = self._resolve(node.user if names else None, node.uid, numbers, True)
        gid, why_g = self._resolve(node.group if names else None, node.gid, numbers, False)
        if uid is None or gid is None:
            self._problem(target.display, "cannot set the owner", why or why_g)
            return
        st = target.st
        assert st is not None
        if (st.st_uid, st.st_gid) == (uid, gid):
            return
        try:
            target.chown(uid, gid)
        except OSError as e:
            self._problem(target.display, f"cannot set the owner to {uid}:{gid}", e)
            return
        target.stat()  # chown may have cleared setuid/setgid bits

    def _xattrs(self, target: _Target) -> None:
        node = target.node
        wanted = {os.fsdecode(k): v for k, v in node.xattrs}
        if not target.fresh and not node.is_symlink:
            try:
                for name in target.listxattr():
                    if name.startswith(STORED_XATTR_PREFIXES) and name not in wanted:
                        target.removexattr(name)
            except OSError as e:
                self._problem(target.display, "cannot remove stale extended attributes", e)
        for name, value in wanted.items():
            try:
                target.setxattr(name, value)
            except OSError as e:
                self._problem(target.display, f"cannot set extended attribute {name}", e)

    def _final_mode(self, target: _Target) -> int | None:
        """The permission bits the node should end with (None: leave as is)."""
        node = target.node
        if node.is_symlink:
            return None
        default = (0o777 if node.is_dir else 0o666) & ~self._umask
        if not self.options.same_permissions:
            return default if target.created else target.restore_mode
        flags = node.feature_flags
        if flags & (F.WITH_PERMISSIONS | F.WITH_ACL):
            return node.mode & 0o7777
        if flags & F.WITH_READ_ONLY:
            return default | 0o200 if node.mode & 0o222 else default & ~0o222
        return default if target.created else target.restore_mode

    def _acl_ids(self, target: _Target, entries: Sequence[AclEntry],
                 user: bool) -> list[tuple[int, int]] | None:
        flags = target.node.feature_flags
        numbers = bool(flags & (F.WITH_16BIT_UIDS | F.WITH_32BIT_UIDS))
        out = []
        for entry in entries:
            name = entry.name if flags & F.WITH_USER_NAMES else None
            ident, why = self._resolve(name, entry.id, numbers, user)
            if ident is None:
                self._problem(target.display, "cannot set the ACL", why)
                return None
            out.append((ident, entry.perm))
        return out

    def _acls(self, target: _Target) -> None:
        node = target.node
        mode = node.mode
        if node.acl_users or node.acl_groups or node.acl_group_obj is not None:
            users = self._acl_ids(target, node.acl_users, True)
            groups = self._acl_ids(target, node.acl_groups, False)
            if users is None or groups is None:
                return
            group_bits = (mode >> 3) & 7
            acl = PosixAcl(user_obj=(mode >> 6) & 7, other=mode & 7, users=users, groups=groups,
                           group_obj=group_bits if node.acl_group_obj is None else node.acl_group_obj,
                           mask=group_bits if node.acl_group_obj is not None or users or groups else None)
            self._set_acl(target, ACL_XATTR_ACCESS, acl.encode(), "ACL")
        elif not target.fresh or (target.may_inherit_acl and target.getxattr(ACL_XATTR_ACCESS) is not None):
            self._drop_acl(target, ACL_XATTR_ACCESS, "ACL")
        if not node.is_dir:
            return
        if node.acl_default is not None or node.acl_default_users or node.acl_default_groups:
            users = self._acl_ids(target, node.acl_default_users, True)
            groups = self._acl_ids(target, node.acl_default_groups, False)
            if users is None or groups is None:
                return
            user_obj, group_obj, other, mask = node.acl_default or (F.NO_PERMS,) * 4
            if user_obj == F.NO_PERMS:  # casync writes no default ACL without the object entries
                return
            acl = PosixAcl(user_obj=user_obj & 7, group_obj=group_obj & 7, other=other & 7,
                           mask=None if mask == F.NO_PERMS else mask & 7, users=users, groups=groups)
            self._set_acl(target, ACL_XATTR_DEFAULT, acl.encode(), "default ACL")
        elif target.getxattr(ACL_XATTR_DEFAULT) is not None:
            self._drop_acl(target, ACL_XATTR_DEFAULT, "default ACL")

    def _set_acl(self, target: _Target, xattr: str, value: bytes, what: str) -> None:
        try:
            target.setxattr(xattr, value)
        except OSError as e:
            self._problem(target.display, f"cannot set the {what}", e)

    def _drop_acl(self, target: _Target, xattr: str, what: str) -> None:
        try:
            target.removexattr(xattr)
        except OSError as e:
            self._problem(target.display, f"cannot remove the {what}", e)


def extract_archive(stream: Readable, target: str | bytes | os.PathLike[str], name: str = "archive",
                    options: ExtractOptions | None = None,
                    warn: Callable[[str], None] | None = None) -> list[str]:
    """Decode the catar in `stream` and write it under `target`; returns the warnings."""
    extractor = TreeExtractor(target, options, warn)
    return extractor.extract(ArchiveDecoder(stream, name))


__all__ = ["ExtractError", "ExtractOptions", "TreeExtractor", "current_umask", "extract_archive"]
