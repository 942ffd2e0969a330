"""untar (and `extract` of a .caidx): catar archives written back to real directories.

Trees restored by pydesync are compared with the source trees (regenerated
with the casync vectors' gen.py) through the real casync: `casync digest`
covers every feature the archive records (ACLs, xattrs, chattr, capabilities,
owners, times), `casync mtree` gives a readable diff. Corrupted archives and
hostile targets must fail with one `Error:` line and never write outside the
target. Non-root behaviour is tested in a forked child that drops to `nobody`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from conftest import assert_clean_error, need, run_cli
from procutil import HANG_GUARD

from pydesync.catar import DirectoryEnd, Node
from pydesync.catar import format as F
from pydesync.catar.extractor import ExtractError, ExtractOptions, TreeExtractor, extract_archive
from pydesync.platform import FS_IOC_SETFLAGS, read_chattr, write_chattr

PORTABLE = ["permissions", "nsec-time", "symlinks", "device-nodes", "fifos", "sockets"]
PORTABLE_WITH = [f"--with={f}" for f in PORTABLE]
FS_NOATIME_FL, FS_SYNC_FL = 0x80, 0x8
NOBODY = 65534
IS_ROOT = os.geteuid() == 0


# ---- helpers ---------------------------------------------------------------------------------
def supports_metadata(folder: Path) -> bool:
    """user xattrs, POSIX ACLs and chattr flags all work in `folder`."""
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
        os.setxattr(probe, "user.probe", b"1")
        fd = os.open(probe, os.O_RDONLY)
        try:
            write_chattr(fd, FS_NOATIME_FL, FS_NOATIME_FL)
            ok = bool(read_chattr(fd) & FS_NOATIME_FL)
            write_chattr(fd, 0, FS_NOATIME_FL)
        finally:
            os.close(fd)
        os.setxattr(probe, "system.posix_acl_access",
                    struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0xFFFFFFFF)
                    + struct.pack("<HHI", 4, 4, 0xFFFFFFFF) + struct.pack("<HHI", 0x20, 4, 0xFFFFFFFF))
        return ok
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    """A module-wide directory on a filesystem with xattrs, ACLs and chattr (ext4 /tmp or /var/tmp)."""
    base = tmp_path_factory.mktemp("untar")
    if supports_metadata(base):
        yield base
        return
    fallback = Path(tempfile.mkdtemp(prefix="pydesync-untar-", dir="/var/tmp"))
    try:
        if not supports_metadata(fallback):
            need(False, "no filesystem with xattrs + ACLs + chattr for the untar tests")
        yield fallback
    finally:
        subprocess.run(["chattr", "-R", "-i", "-a", str(fallback)], capture_output=True)
        shutil.rmtree(fallback, ignore_errors=True)


@pytest.fixture
def wdir(work: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for one test, on the metadata-capable filesystem."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:80]
    folder = work / name
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def trees(casync_data: Path, work: Path) -> dict[str, Path]:
    """The casync vectors' source trees, regenerated (the full one only as root)."""
    out = {}
    gen = str(casync_data / "gen.py")
    out["portable"] = work / "src-portable"
    subprocess.run([sys.executable, gen, "tree", str(out["portable"])], check=True)
    if IS_ROOT:
        out["full"] = work / "src-full"
        subprocess.run([sys.executable, gen, "tree", str(out["full"]), "--full"], check=True)
    return out


def need_root(what: str) -> None:
    """Root-only tests skip as an ordinary user (and fail under PYDESYNC_REQUIRE_PEERS=1)."""
    need(IS_ROOT, f"{what} needs root")


def tree(trees: dict[str, Path], kind: str) -> Path:
    if kind not in trees:
        need_root("the full casync tree")
    return trees[kind]


def casync_view(casync: str, path: Path, kind: str) -> tuple[str, str]:
    """(digest, mtree) of a directory as casync sees it with the archive's features."""
    flags = PORTABLE_WITH if kind == "portable" else []
    digest = subprocess.run([casync, "digest", *flags, str(path)], capture_output=True, text=True, check=True)
    mtree = subprocess.run([casync, "mtree", *flags, str(path)], capture_output=True, text=True, check=True)
    return digest.stdout.strip(), mtree.stdout


def assert_same_tree(casync: str, restored: Path, source: Path, kind: str) -> None:
    got_digest, got_mtree = casync_view(casync, restored, kind)
    want_digest, want_mtree = casync_view(casync, source, kind)
    assert got_mtree == want_mtree
    assert got_digest == want_digest


def records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, size, type) of every record of a catar (it is a flat sequence of records)."""
    out, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack_from("<QQ", data, pos)
        out.append((pos, size, kind))
        pos += size
    return out


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    """Everything below `folder` (names, modes, sizes), to prove nothing changed there."""
    items = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            items.append((os.path.relpath(os.path.join(dirpath, name), folder), st.st_mode, st.st_size))
    return sorted(items)


def temp_leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".#pydesync.*")]


def as_nobody(cwd: Path, func, *args) -> dict:  # type: ignore[no-untyped-def]
    """Run func(*args) in a forked child with uid/gid nobody and working directory `cwd` (entered
    while still root: the test's temporary directories are not searchable by nobody)."""
    need_root("dropping to nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            os.chdir(cwd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = {"ok": True, "value": func(*args)}
        except BaseException as e:  # reported to the parent
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        with os.fdopen(write_end, "w") as f:
            json.dump(result, f)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def nobody_dir(folder: Path) -> Path:
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    return folder


# ---- casync vectors -> pydesync --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["portable", "full"])
@pytest.mark.parametrize("how", ["catar", "caidx-untar", "caidx-extract", "stdin"])
def test_vectors_restore_identical_trees(cli, casync, casync_data, trees, wdir, kind, how):
    source = tree(trees, kind)
    out = wdir / "out"
    if how == "catar":
        result = cli("untar", casync_data / f"tree-{kind}.catar", out)
    elif how == "stdin":
        result = cli("untar", "-", out, input=(casync_data / f"tree-{kind}.catar").read_bytes())
    elif how == "caidx-untar":
        result = cli("untar", "-i", "-s", casync_data / f"tree-{kind}.castr",
                     casync_data / f"tree-{kind}.caidx", out)
    else:
        result = cli("extract", "-s", casync_data / f"tree-{kind}.castr",
                     casync_data / f"tree-{kind}.caidx", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_same_tree(casync, out, source, kind)
    assert temp_leftovers(out) == []


def test_full_vector_details(cli, casync_data, trees, wdir):
    """Spot checks of what casync's digest covers: ACLs, xattrs, caps, chattr, owner, device."""
    tree(trees, "full")
    out = wdir / "out"
    assert cli("untar", casync_data / "tree-full.catar", out).returncode == 0
    assert os.getxattr(out / "xattr-file", "user.alpha") == b"first\0value"
    assert os.getxattr(out / "xattr-file", "user.zeta") == b"last"
    st = os.lstat(out / "owned-by-nobody")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(os.lstat(out / "acl-file").st_mode) == 0o674
    assert os.getxattr(out / "acl-file", "system.posix_acl_access")
    assert os.getxattr(out / "acl-dir", "system.posix_acl_default")
    assert os.getxattr(out / "fcaps-file", "security.capability")
    fd = os.open(out / "noatime-file", os.O_RDONLY)
    try:
        assert read_chattr(fd) & FS_NOATIME_FL
    finally:
        os.close(fd)
    dev = os.lstat(out / "null-dev")
    assert stat.S_ISCHR(dev.st_mode) and (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (1, 3)
    assert os.lstat(out / "README").st_mtime_ns == 1600000000123456789
    assert os.lstat(out / "link").st_mtime_ns == 1600000000123456789
    assert not (out / "nodump-file").exists()
    assert stat.S_IMODE(os.lstat(out / "suid-ro").st_mode) == 0o4555


# ---- pydesync tar -> casync extract, and our own round trip ------------------------------------
@pytest.mark.parametrize("kind", ["portable", "full"])
def test_casync_extracts_our_archives(cli, casync, trees, wdir, kind):
    source = tree(trees, kind)
    archive = wdir / "ours.catar"
    flags = PORTABLE_WITH if kind == "portable" else []
    assert cli("tar", *flags, archive, source).returncode == 0
    by_casync = wdir / "by-casync"
    subprocess.run([casync, "extract", str(archive), str(by_casync)], check=True, capture_output=True)
    assert_same_tree(casync, by_casync, source, kind)
    by_us = wdir / "by-us"
    result = cli("untar", archive, by_us)
    assert result.returncode == 0, result.stderr
    assert_same_tree(casync, by_us, source, kind)


def test_tar_index_round_trip(cli, casync, trees, wdir):
    source = tree(trees, "portable")
    store, index = wdir / "s.castr", wdir / "t.caidx"
    assert cli("tar", *PORTABLE_WITH, "-i", "-s", store, index, source).returncode == 0
    out = wdir / "out"
    assert cli("untar", "-i", "-s", store, index, out).returncode == 0
    assert_same_tree(casync, out, source, "portable")
    subprocess.run([casync, "extract", f"--store={store}", str(index), str(wdir / "c")], check=True,
                   capture_output=True)
    assert_same_tree(casync, wdir / "c", source, "portable")


# ---- desync's test archives -------------------------------------------------------------------
def entries(root: Path) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def test_desync_nested_and_flatdir(cli, desync_data, wdir):
    out = wdir / "nested"
    args = [] if IS_ROOT else ["--no-same-owner"]
    assert cli("untar", *args, desync_data / "testdata" / "nested.catar", out).returncode == 0
    found = entries(out)
    assert sorted(found) == ["dir1", "dir1/sub11", "dir1/sub11/f11", "dir1/sub11/f12", "dir1/sub12", "dir2",
                             "dir2/sub21", "dir2/sub22"]
    assert all(stat.S_ISDIR(found[n].st_mode) for n in ("dir1", "dir1/sub11", "dir1/sub12", "dir2/sub22"))
    assert found["dir1/sub11/f11"].st_size == 0 and stat.S_ISREG(found["dir1/sub11/f12"].st_mode)
    if IS_ROOT:
        root = os.lstat(out)
        assert (root.st_uid, root.st_gid) == (500, 500)
    out = wdir / "flatdir"
    assert cli("untar", *args, desync_data / "testdata" / "flatdir.catar", out).returncode == 0
    found = entries(out)
    assert sorted(found) == ["d1", "d2", "d3", "d4", "d5"]
    assert all(stat.S_ISDIR(s.st_mode) for s in found.values())


def test_desync_flat(cli, desync_data, wdir):
    need_root("flat.catar (a device node, foreign owners)")
    out = wdir / "flat"
    result = cli("untar", desync_data / "testdata" / "flat.catar", out)
    assert result.returncode == 0, result.stderr
    found = entries(out)
    assert sorted(found) == ["device", "file1.txt", "file2.txt", "symlink"]
    root = os.lstat(out)
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o775, 500, 500)
    dev = found["device"]
    assert stat.S_ISCHR(dev.st_mode) and stat.S_IMODE(dev.st_mode) == 0o644
    assert (os.major(dev.st_rdev), os.minor(dev.st_rdev), dev.st_uid) == (1, 8, 0)
    f1, f2 = found["file1.txt"], found["file2.txt"]
    assert (f1.st_size, stat.S_IMODE(f1.st_mode), f1.st_uid, f1.st_gid) == (15, 0o664, 500, 500)
    assert (f2.st_size, stat.S_IMODE(f2.st_mode), f2.st_uid, f2.st_gid) == (15, 0o600, 0, 500)
    assert os.readlink(out / "symlink") == "file1.txt"
    assert os.getxattr(out, "security.selinux").rstrip(b"\0")  # the archive's SELinux label


def test_desync_complex(cli, desync_data, wdir):
    out = wdir / "complex"
    args = [] if IS_ROOT else ["--no-same-owner"]
    assert cli("untar", *args, desync_data / "testdata" / "complex.catar", out).returncode == 0
    found = entries(out)
    assert sorted(found) == ["char.blk", "char.dev", "relative.symlink", "subdir1", "subdir1/subdir11",
                             "subdir1/subdir12", "subdir1/subdir12/blank", "subdir1/subdir12/file.txt",
                             "subdir2", "subdir2/subdir21", "subdir2/subdir21/symlink", "test1.file",
                             "test2.file"]
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o775
    for name in ("char.blk", "char.dev"):
        assert stat.S_ISREG(found[name].st_mode) and found[name].st_size == 0
        assert stat.S_IMODE(found[name].st_mode) == 0o644
    assert os.readlink(out / "relative.symlink") == "test1.file"
    assert os.readlink(out / "subdir2/subdir21/symlink") == "../../test2.file"
    assert [found[n].st_size for n in ("subdir1/subdir12/blank", "subdir1/subdir12/file.txt", "test1.file",
                                       "test2.file")] == [0, 695, 603, 722]
    if IS_ROOT:
        assert (found["test1.file"].st_uid, found["char.dev"].st_uid) == (1000, 0)


def check_desync_tree(out: Path) -> None:
    found = entries(out)
    assert sorted(found) == ["nested1", "nested1/nested2", "nested1/nested2/f", "subdir1", "subdir1/f1",
                             "subdir2", "subdir2/f2", "subdir3", "subdir3/f3", "symlink-dir", "symlink-file"]
    for i in (1, 2, 3):
        assert (out / f"subdir{i}" / f"f{i}").read_text() == f"file in subdir{i}\n"
    assert os.readlink(out / "symlink-dir") == "subdir1"
    assert os.readlink(out / "symlink-file") == "subdir1/f1"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(found["subdir1/f1"].st_mode) == 0o666 & ~umask  # --no-same-permissions
    assert stat.S_IMODE(found["nested1"].st_mode) == 0o777 & ~umask
    assert found["subdir1/f1"].st_uid == os.geteuid()  # --no-same-owner


def test_desync_tree_catar_and_caidx(cli, desync_cmd, wdir):
    out = wdir / "catar"
    result = cli("untar", "--no-same-owner", "--no-same-permissions", desync_cmd / "tree.catar", out)
    assert result.returncode == 0, result.stderr
    check_desync_tree(out)
    out = wdir / "caidx"
    result = cli("untar", "-s", desync_cmd / "tree.store", "-i", "--no-same-owner", "--no-same-permissions",
                 desync_cmd / "tree.caidx", out)
    assert result.returncode == 0, result.stderr
    check_desync_tree(out)
    out = wdir / "stdin-index"
    result = cli("untar", "-s", desync_cmd / "tree.store", "-i", "--no-same-owner", "--no-same-permissions",
                 "-", out, input=(desync_cmd / "tree.caidx").read_bytes())
    assert result.returncode == 0, result.stderr
    check_desync_tree(out)


# ---- hostile archives --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_source(work: Path) -> Path:
    """A tree whose names are easy to corrupt in place: 'xx' (-> '..'), 'a_b' (-> 'a/b', 'a\\0b')."""
    root = work / "bad-source"
    (root / "xx").mkdir(parents=True)
    (root / "xx" / "pwned").write_bytes(b"escaped!\n")
    (root / "a_b").write_bytes(b"x" * 5000)
    (root / "z").write_bytes(b"zz")
    os.setxattr(root / "z", "user.one", b"1")
    os.setxattr(root / "z", "user.two", b"2")
    for p in [root, *root.rglob("*")]:
        os.utime(p, ns=(1, 1600000000 * 10**9), follow_symlinks=False)
    return root


@pytest.fixture(scope="module")
def good_archive(bad_source: Path, work: Path) -> bytes:
    path = work / "good.catar"
    assert run_cli("tar", "--with=permissions,nsec-time,xattrs,symlinks", path, bad_source).returncode == 0
    return path.read_bytes()


def corrupt(data: bytes, how: str) -> bytes:
    recs = records(data)
    buf = bytearray(data)

    def filename(name: bytes) -> int:
        return next(o for o, s, k in recs if k == F.FILENAME and data[o + 16:o + s - 1] == name)

    if how in ("dotdot", "slash", "nul"):
        old = b"xx" if how == "dotdot" else b"a_b"
        new = {"dotdot": b"..", "slash": b"a/b", "nul": b"a\0b"}[how]
        pos = filename(old)
        buf[pos + 16:pos + 16 + len(old)] = new
    elif how.startswith("truncate"):
        return data[:int(len(data) * float(how.split("-")[1]))]
    elif how == "goodbye":
        pos = next(o for o, s, k in recs if k == F.GOODBYE)
        buf[pos + 16 + 16] ^= 0xFF  # the first item's hash
    elif how == "huge-record":
        pos = filename(b"z")
        struct.pack_into("<Q", buf, pos, 2**62)
    elif how == "huge-payload":
        pos = next(o for o, s, k in recs if k == F.PAYLOAD)
        struct.pack_into("<Q", buf, pos, 2**40)
    elif how == "flags":
        pos = [o for o, s, k in recs if k == F.ENTRY][2]
        struct.pack_into("<Q", buf, pos + 16, struct.unpack_from("<Q", buf, pos + 16)[0] | F.WITH_FIFOS)
    elif how == "meta-order":
        xattrs = [(o, s) for o, s, k in recs if k == F.XATTR]
        (o1, s1), (o2, s2) = xattrs
        assert o1 + s1 == o2 and s1 == s2
        buf[o1:o2 + s2] = data[o2:o2 + s2] + data[o1:o1 + s1]
    elif how == "trailing":
        return data + b"\0" * 16
    else:
        raise AssertionError(how)
    return bytes(buf)


@pytest.mark.parametrize("how,fragment", [
    ("dotdot", "invalid file name"), ("slash", "invalid file name"), ("nul", "invalid file name"),
    ("truncate-0.5", "truncated"), ("truncate-0.99", "truncated"), ("truncate-0.1", "truncated"),
    ("goodbye", "GOODBYE"), ("huge-record", "exceeds"), ("huge-payload", "truncated"),
    ("flags", "feature flags"), ("meta-order", "XATTR"), ("trailing", "after the end"),
])
def test_bad_archives_fail_cleanly(cli, good_archive, wdir, how, fragment):
    archive = wdir / "bad.catar"
    archive.write_bytes(corrupt(good_archive, how))
    sentinel = wdir / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"keep")
    before = snapshot(sentinel)
    target = wdir / "box" / "target"
    target.parent.mkdir()
    result = cli("untar", archive, target)
    assert_clean_error(result, fragment)
    assert snapshot(sentinel) == before
    assert sorted(p.name for p in wdir.iterdir()) == ["bad.catar", "box", "sentinel"]
    assert sorted(p.name for p in (wdir / "box").iterdir()) == []  # a new target: nothing left at all
    assert [p for p in wdir.rglob("pwned") if target not in p.parents] == []
    assert temp_leftovers(wdir) == []


def test_good_archive_extracts(cli, casync, good_archive, bad_source, wdir):
    (wdir / "a.catar").write_bytes(good_archive)
    assert cli("untar", wdir / "a.catar", wdir / "out").returncode == 0
    assert (wdir / "out" / "xx" / "pwned").read_bytes() == b"escaped!\n"
    assert os.getxattr(wdir / "out" / "z", "user.two") == b"2"


def node(path: bytes, mode: int, target: bytes | None = None, flags: int = 0xB000000000001F20) -> Node:
    return Node(path, path.rsplit(b"/", 1)[-1], 0, flags, mode, 0, 0, 0, 1600000000 * 10**9, target=target,
                size=0 if stat.S_ISREG(mode) else None)


def test_extractor_rejects_bad_names_itself(wdir):
    """Defence in depth: even nodes that bypass the decoder cannot name '..', 'a/b' or NUL. The
    targets were new: nothing of them is left (an existing one keeps what it had)."""
    for i, bad in enumerate((b"..", b".", b"a/b", b"a\0b", b"")):
        root = node(b"", stat.S_IFDIR | 0o755)
        child = node(bad or b"x", stat.S_IFREG | 0o644)
        child.name = bad
        target = wdir / f"t{i}"
        with pytest.raises(ExtractError, match="invalid file name"):
            TreeExtractor(target).extract([root, child, DirectoryEnd(root)])
    existing = wdir / "existing"
    existing.mkdir()
    (existing / "kept").write_bytes(b"kept")
    with pytest.raises(ExtractError, match="invalid file name"):
        TreeExtractor(existing).extract([root, child, DirectoryEnd(root)])
    assert sorted(os.listdir(wdir)) == ["existing"]
    assert os.listdir(existing) == ["kept"]


def test_symlink_then_directory_of_same_name_never_follows_it(wdir):
    """A symlink from the archive is never followed by later entries: refused, or (overwriting)
    replaced by the directory itself."""
    outside = wdir / "outside"
    outside.mkdir()
    root = node(b"", stat.S_IFDIR | 0o755)
    link = node(b"s", stat.S_IFLNK | 0o777, target=str(outside).encode())
    sub = node(b"s", stat.S_IFDIR | 0o755)
    inner = node(b"s/x", stat.S_IFREG | 0o644)
    items = [root, link, sub, inner, DirectoryEnd(sub), DirectoryEnd(root)]
    with pytest.raises(ExtractError, match="symlink"):
        TreeExtractor(wdir / "t").extract(items)
    assert os.listdir(outside) == []
    for opts in (ExtractOptions(overwrite=True), ExtractOptions(overwrite=True, best_effort=True)):
        extractor = TreeExtractor(wdir / f"t{int(opts.best_effort)}", opts)
        extractor.extract(items)
        assert not (wdir / f"t{int(opts.best_effort)}" / "s").is_symlink()
        assert (wdir / f"t{int(opts.best_effort)}" / "s" / "x").is_file()
    assert os.listdir(outside) == []


# ---- hostile or occupied targets ----------------------------------------------------------------
@pytest.fixture
def simple_archive(cli, wdir) -> Path:
    src = wdir / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "inner").write_bytes(b"inner\n")
    (src / "README").write_bytes(b"new\n")
    (src / "other").write_bytes(b"other\n")
    archive = wdir / "simple.catar"
    assert cli("tar", *PORTABLE_WITH, archive, src).returncode == 0
    return archive


def test_existing_symlink_at_directory_place(cli, simple_archive, wdir):
    """A symlink where the archive has a directory: replaced by the directory (the link itself,
    never followed: nothing lands outside), or with --overwrite=false refused."""
    outside = wdir / "outside"
    outside.mkdir()
    target = wdir / "target"
    target.mkdir()
    (target / "sub").symlink_to("../outside")
    result = cli("untar", "--overwrite=false", simple_archive, target)
    assert_clean_error(result, "sub", "symlink", "--overwrite=false")
    assert os.listdir(outside) == [] and os.readlink(target / "sub") == "../outside"
    result = cli("untar", "--best-effort", "--overwrite=false", simple_archive, target)
    assert result.returncode == 0
    assert result.stderr.startswith("Warning: ") and "sub" in result.stderr
    assert os.listdir(outside) == []
    assert (target / "other").read_bytes() == b"other\n"
    assert cli("untar", simple_archive, target).returncode == 0  # the default, as desync
    assert not (target / "sub").is_symlink() and (target / "sub" / "inner").read_bytes() == b"inner\n"
    assert os.listdir(outside) == []


def test_existing_symlink_at_file_place_is_replaced_not_followed(cli, simple_archive, wdir):
    outside = wdir / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"victim\n")
    target = wdir / "target"
    target.mkdir()
    (target / "README").symlink_to("../outside/victim")
    assert_clean_error(cli("untar", "--overwrite=false", simple_archive, target), "README", "already exists")
    assert cli("untar", simple_archive, target).returncode == 0
    assert (outside / "victim").read_bytes() == b"victim\n"
    assert not (target / "README").is_symlink()
    assert (target / "README").read_bytes() == b"new\n"


def test_existing_files_are_replaced_as_desync_does_or_kept(cli, simple_archive, wdir):
    """A re-run untar replaces what the archive holds (desync's behaviour, scripts re-run it) and
    keeps the rest; --overwrite=false refuses, or with --best-effort warns and keeps."""
    target = wdir / "target"
    (target / "sub").mkdir(parents=True)
    (target / "README").write_bytes(b"old\n")
    (target / "sub" / "inner").write_bytes(b"old inner\n")
    (target / "mine").write_bytes(b"mine\n")
    result = cli("untar", "--overwrite=false", simple_archive, target)
    assert_clean_error(result, "README", "already exists", "--overwrite=false")
    assert (target / "README").read_bytes() == b"old\n"
    result = cli("untar", "--best-effort", "--overwrite=false", simple_archive, target)
    assert result.returncode == 0
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["Warning", "Warning"]
    assert (target / "README").read_bytes() == b"old\n"
    assert (target / "sub" / "inner").read_bytes() == b"old inner\n"
    assert (target / "other").read_bytes() == b"other\n"
    for _ in range(2):  # the default, and again: a re-run untar works
        result = cli("untar", simple_archive, target)
        assert result.returncode == 0 and result.stderr == ""
        assert (target / "README").read_bytes() == b"new\n"
        assert (target / "sub" / "inner").read_bytes() == b"inner\n"
        assert (target / "mine").read_bytes() == b"mine\n"  # merged, not wiped
        assert temp_leftovers(target) == []


def test_overwrite_replaces_a_directory_with_a_file_and_vice_versa(cli, simple_archive, wdir):
    target = wdir / "target"
    (target / "README" / "deep").mkdir(parents=True)
    (target / "sub").write_bytes(b"a file where the archive has a directory\n")
    assert_clean_error(cli("untar", "--overwrite=false", simple_archive, target), "README", "already exists")
    assert cli("untar", simple_archive, target).returncode == 0
    assert (target / "README").read_bytes() == b"new\n"
    assert (target / "sub" / "inner").read_bytes() == b"inner\n"


def test_target_that_is_a_file(cli, simple_archive, wdir):
    (wdir / "file").write_bytes(b"")
    assert_clean_error(cli("untar", simple_archive, wdir / "file"), "not a directory")


def test_read_only_tree_extracts(cli, casync, wdir):
    src = wdir / "src"
    (src / "ro" / "inner").mkdir(parents=True)
    (src / "ro" / "inner" / "f").write_bytes(b"f\n")
    (src / "ro" / "g").write_bytes(b"g\n")
    os.chmod(src / "ro" / "inner" / "f", 0o444)
    os.chmod(src / "ro" / "g", 0o400)
    os.chmod(src / "ro" / "inner", 0o500)
    os.chmod(src / "ro", 0o555)
    archive = wdir / "ro.catar"
    assert cli("tar", *PORTABLE_WITH, archive, src).returncode == 0
    os.chmod(archive, 0o644)
    out = wdir / "out"
    assert cli("untar", archive, out).returncode == 0
    assert casync_view(casync, out, "portable") == casync_view(casync, src, "portable")
    if not IS_ROOT:
        return
    # root ignores permission bits; the real test is as an ordinary user
    box = nobody_dir(wdir / "box")
    fd = os.open(archive, os.O_RDONLY)

    def untar_as_nobody() -> list[str]:
        with os.fdopen(fd, "rb") as f:
            return extract_archive(f, "out")

    try:
        result = as_nobody(box, untar_as_nobody)
    finally:
        os.close(fd)
    assert result["ok"], result
    assert casync_view(casync, box / "out", "portable") == casync_view(casync, src, "portable")
    assert stat.S_IMODE(os.lstat(box / "out" / "ro" / "inner").st_mode) == 0o500


def test_immutable_and_append_only_come_last(cli, casync, wdir):
    """chattr +i/+a are applied after content, times and the rename (a +i directory after its children)."""
    need_root("chattr +i/+a")
    src = wdir / "src"
    (src / "idir").mkdir(parents=True)
    (src / "idir" / "inner").write_bytes(b"inner\n")
    (src / "ifile").write_bytes(b"immutable\n")
    (src / "afile").write_bytes(b"append only\n")
    try:
        for name, flag in (("ifile", 0x10), ("afile", 0x20), ("idir", 0x10)):
            fd = os.open(src / name, os.O_RDONLY)
            try:
                write_chattr(fd, flag, flag)
            finally:
                os.close(fd)
        archive = wdir / "a.catar"
        assert cli("tar", archive, src).returncode == 0
        result = cli("untar", archive, wdir / "out")
        assert result.returncode == 0, result.stderr
        assert casync_view(casync, wdir / "out", "full") == casync_view(casync, src, "full")
        assert (wdir / "out" / "idir" / "inner").read_bytes() == b"inner\n"
    finally:
        subprocess.run(["chattr", "-R", "-i", "-a", str(wdir)], capture_output=True)


# ---- what cannot be restored: errors, or warnings with --best-effort -------------------------
def test_full_vector_as_nobody(casync_data, wdir):
    """As non-root: owners, capabilities and device nodes cannot be restored."""
    box = nobody_dir(wdir / "box")
    fd = os.open(casync_data / "tree-full.catar", os.O_RDONLY)

    def run(options: ExtractOptions, name: str):  # type: ignore[no-untyped-def]
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                return extract_archive(f, name, options=options)
            except ExtractError as e:
                return f"error: {e}"

    strict = as_nobody(box, run, ExtractOptions(), "strict")
    assert strict["ok"], strict
    assert strict["value"].startswith("error: strict/") and "owner" in strict["value"]
    assert "Operation not permitted" in strict["value"]
    lenient = as_nobody(box, run, ExtractOptions(best_effort=True, same_owner=False), "lenient")
    everyone = as_nobody(box, run, ExtractOptions(best_effort=True), "owners")
    os.close(fd)
    assert lenient["ok"], lenient
    warnings = lenient["value"]
    assert isinstance(warnings, list)
    assert any(w.startswith("lenient/null-dev: cannot create device node") for w in warnings), warnings
    assert any(w.startswith("lenient/fcaps-file: cannot set file capabilities") for w in warnings), warnings
    assert len(warnings) == 2, warnings
    out = box / "lenient"
    assert (out / "README").read_bytes() == b"hello casync\n"
    assert os.getxattr(out / "xattr-file", "user.zeta") == b"last"
    assert not (out / "null-dev").exists()
    assert os.lstat(out / "README").st_uid == NOBODY
    assert everyone["ok"], everyone
    assert any("cannot set the owner to 0:0" in w for w in everyone["value"])


def test_chattr_the_target_filesystem_lacks(cli, wdir):
    """chattr +S restores on ext4 but not on tmpfs: error by default, warning with --best-effort."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        need(False, "no writable /dev/shm")
    src = wdir / "src"
    src.mkdir()
    (src / "synced").write_bytes(b"sync me\n")
    fd = os.open(src / "synced", os.O_RDONLY)
    try:
        write_chattr(fd, FS_SYNC_FL, FS_SYNC_FL)
    except OSError:
        need(False, "the work filesystem has no chattr +S")
    finally:
        os.close(fd)
    archive = wdir / "sync.catar"
    assert cli("tar", archive, src).returncode == 0
    box = Path(tempfile.mkdtemp(prefix="pydesync-untar-", dir=shm))
    try:
        probe = box / "probe"
        probe.write_bytes(b"")
        fd = os.open(probe, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", FS_SYNC_FL))
            need(False, "this tmpfs supports chattr +S")
        except OSError:
            pass
        finally:
            os.close(fd)
        result = cli("untar", archive, box / "strict")
        assert_clean_error(result, "strict/synced", "chattr")
        assert temp_leftovers(box) == []
        result = cli("untar", "--best-effort", archive, box / "lenient")
        assert result.returncode == 0
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Warning: ") and "lenient/synced" in lines[0], lines
        assert "chattr" in lines[0]
        assert (box / "lenient" / "synced").read_bytes() == b"sync me\n"
    finally:
        shutil.rmtree(box, ignore_errors=True)


def test_no_same_owner_and_permissions(cli, casync_data, wdir):
    out = wdir / "out"
    archive = casync_data / "tree-portable.catar"
    result = cli("untar", "--no-same-owner", "--no-same-permissions", archive, out)
    assert result.returncode == 0, result.stderr
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.lstat(out / "suid-ro").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.lstat(out / "sub" / "deeper").st_mode) == 0o777 & ~umask
    assert os.lstat(out / "README").st_mtime_ns == 1600000000123456789  # times still restored


# ---- command line ------------------------------------------------------------------------------
def test_cli_errors(cli, casync_data, desync_cmd, wdir):
    assert_clean_error(cli("untar", "-i", desync_cmd / "tree.caidx", wdir / "o"), "-i requires")
    assert_clean_error(cli("untar", wdir / "missing.catar", wdir / "o"), "missing.catar")
    assert_clean_error(cli("untar", desync_cmd / "blob1.caibx", wdir / "o"), "invalid archive")
    assert_clean_error(cli("extract", "-k", "-s", casync_data / "tree-portable.castr",
                           casync_data / "tree-portable.caidx", wdir / "o2"), "in-place")
    assert_clean_error(cli("untar", "-i", "-s", wdir / "nostore", desync_cmd / "tree.caidx", wdir / "o3"))
    assert_clean_error(cli("untar", "--output-format=gnu-tar", wdir / "missing.catar", wdir / "o.tar"),
                       "missing.catar")
    assert not (wdir / "o.tar").exists()


# ---- the batched writer behind untar's fast path ------------------------------------------------
def test_batch_writer_finishes_deferred_work_after_earlier_files(wdir):
    """Deferred work (a directory's times) runs only once every file queued before it exists,
    across batch boundaries and the writer thread; files keep their data, mode and mtime."""
    from pydesync.catar import filewriter

    fd = os.open(wdir, os.O_RDONLY | os.O_DIRECTORY)
    seen: list[tuple[int, int]] = []
    writer = filewriter.BatchWriter(lambda n: seen.append((n, len(os.listdir(wdir)))), umask=0o022)
    total = filewriter.BATCH_FILES * 2 + 7
    try:
        for i in range(total):
            writer.add(fd, b".tmp%d" % i, b"f%05d" % i, memoryview(b"x" * i), 0o640, i * 10**9 + 5, i)
            if i % 100 == 99:
                writer.defer(i + 1)
        writer.flush()
    finally:
        os.close(fd)
    assert [n for n, _ in seen] == list(range(100, total, 100))
    assert all(count >= n for n, count in seen)
    assert len(os.listdir(wdir)) == total
    st = os.stat(wdir / "f00123")
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (123, 0o640, 123 * 10**9 + 5)


def test_batch_writer_failure_names_the_file_and_returns_pending_work(wdir):
    """A file that cannot be created is reported by its label; later files are not written, the
    deferred work that never ran comes back so its descriptors can be closed, nothing is left."""
    from pydesync.catar import filewriter

    fd = os.open(wdir, os.O_RDONLY | os.O_DIRECTORY)
    (wdir / "taken").mkdir()
    writer = filewriter.BatchWriter(lambda n: None, umask=0o022)
    try:
        writer.add(fd, b".t0", b"a", b"1", 0o644, -1, "a")
        writer.add(fd, b".t1", b"taken", b"2", 0o644, -1, "taken")  # rename onto a directory
        writer.defer("after-taken")
        writer.add(fd, b".t2", b"z", b"3", 0o644, -1, "z")
        with pytest.raises(filewriter.WriteFailed) as failure:
            writer.flush()
        assert failure.value.label == "taken" and failure.value.error.errno == errno.EISDIR
        assert writer.abandon() == ["after-taken"]
    finally:
        os.close(fd)
    assert sorted(os.listdir(wdir)) == ["a", "taken"]


def test_untar_write_failure_is_one_clean_error(cli, wdir):
    """A file of the fast path that cannot be written (here: the name is taken by a directory
    created by a racing process) gives one Error line naming it. (The target exists, and d/ is new
    in it: d/ is filled under a temporary name, where the racer finds it; nothing of it is left.)"""
    src = wdir / "src"
    (src / "d").mkdir(parents=True)
    for i in range(600):
        (src / "d" / f"f{i:03d}").write_bytes(b"%d" % i)
    assert cli("tar", wdir / "a.catar", src).returncode == 0
    # the writer creates f599 last; a FIFO feeding the archive lets the test act before that
    data = (wdir / "a.catar").read_bytes()
    cut = data.index(b"f599\0")
    fifo = wdir / "fifo"
    os.mkfifo(fifo)
    (wdir / "out").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "untar", str(fifo), str(wdir / "out")],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    with open(fifo, "wb") as f:
        f.write(data[:cut])
        f.flush()
        deadline = time.monotonic() + HANG_GUARD  # untar is waiting for the rest of the archive
        while not (filling := [p for p in (wdir / "out").iterdir() if (p / "f000").exists()]):
            assert proc.poll() is None and time.monotonic() < deadline, "untar never filled d/"
            time.sleep(0.01)
        (filling[0] / "f599").mkdir()
        f.write(data[cut:])
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode != 0
    assert err.strip().splitlines() == [f"Error: cannot create {wdir}/out/d/f599: Is a directory"]
    assert os.listdir(wdir / "out") == []


def test_untar_to_a_gnu_tar_stream(cli, wdir):
    """`untar --output-format=gnu-tar`: the archive as a tar file (or on stdout) with names, types,
    modes, owners, times, link targets, device numbers and xattrs (in a PAX header, as desync)."""
    import tarfile

    src = wdir / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(b"hello\n")
    (src / "d" / "b").write_bytes(b"inner\n")
    os.chmod(src / "d" / "b", 0o640)
    (src / "l").symlink_to("a")
    os.mkfifo(src / "f")
    os.setxattr(src / "a", "user.test", b"val\x00ue")
    if IS_ROOT:
        os.mknod(src / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chown(src / "d" / "b", 1234, 5678)
    for path in (src / "a", src / "d" / "b"):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    assert cli("tar", wdir / "x.catar", src).returncode == 0
    r = cli("untar", "--output-format=gnu-tar", wdir / "x.catar", wdir / "x.tar")
    assert r.returncode == 0, r.stderr
    r2 = cli("untar", "--output-format=gnu-tar", wdir / "x.catar", "-")
    assert r2.returncode == 0 and r2.stdout == (wdir / "x.tar").read_bytes()
    with tarfile.open(wdir / "x.tar") as tar:
        members = {m.name: m for m in tar}
        assert tar.extractfile("a").read() == b"hello\n"  # type: ignore[union-attr]
    assert sorted(members) == sorted([".", "a", "d", "d/b", "l", "f"] + (["dev"] if IS_ROOT else []))
    assert members["."].isdir()
    assert members["d"].isdir() and members["l"].issym() and members["l"].linkname == "a"
    assert members["f"].isfifo()
    b = members["d/b"]
    assert (b.mode, b.mtime, b.size) == (0o640, 1_600_000_000, 6)
    xattr = members["a"].pax_headers["SCHILY.xattr.user.test"]
    assert xattr.encode("utf-8", "surrogateescape") == b"val\x00ue"
    if IS_ROOT:
        assert (b.uid, b.gid) == (1234, 5678)
        assert members["dev"].ischr() and (members["dev"].devmajor, members["dev"].devminor) == (1, 3)


@pytest.mark.parametrize("into", ["new", "existing"])
def test_entries_named_like_temporary_files_round_trip(cli, wdir, into):
    """untar's temporary names once were `.#pydesync.<n>`: an archive holding a big file `!x` and a
    symlink `.#pydesync.0` restored `!x` as the symlink and exited 0, and a tree holding such names
    could not round-trip. Every entry comes back as it was, into a new or an existing target."""
    src = wdir / "src"
    src.mkdir()
    (src / "!x").write_bytes(os.urandom(8 << 20))
    (src / ".#pydesync.0").symlink_to("elsewhere")
    (src / ".#pydesync.1").write_bytes(b"a file\n")
    (src / ".#pydesync.2").mkdir()
    (src / ".#pydesync.2" / ".#pydesync.3").write_bytes(b"inner\n")
    for i in range(4, 40):
        (src / f".#pydesync.{i}").write_bytes(b"%d" % i)
    assert cli("tar", wdir / "x.catar", src).returncode == 0
    out = wdir / "out"
    if into == "existing":
        out.mkdir()
        (out / "!x").write_bytes(b"old")
    r = cli("untar", wdir / "x.catar", out)
    assert r.returncode == 0, r.stderr
    assert (out / "!x").read_bytes() == (src / "!x").read_bytes()
    assert os.readlink(out / ".#pydesync.0") == "elsewhere"
    assert (out / ".#pydesync.2" / ".#pydesync.3").read_bytes() == b"inner\n"
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    assert cli("tar", wdir / "y.catar", out).returncode == 0
    assert (wdir / "y.catar").read_bytes() == (wdir / "x.catar").read_bytes()


@pytest.mark.parametrize("how", ["goodbye", "truncate-0.5"])
def test_a_broken_archive_into_a_new_target_leaves_nothing(cli, good_archive, wdir, how):
    """A new target is built under a temporary sibling and renamed into place at the end: a
    failure found late (a bad goodbye table, a cut stream) leaves neither the target nor the
    sibling; a good archive leaves exactly the target."""
    (wdir / "bad.catar").write_bytes(corrupt(good_archive, how))
    (wdir / "box").mkdir()
    assert cli("untar", wdir / "bad.catar", wdir / "box" / "new").returncode != 0
    assert os.listdir(wdir / "box") == []
    (wdir / "good.catar").write_bytes(good_archive)
    r = cli("untar", wdir / "good.catar", wdir / "box" / "new")
    assert r.returncode == 0, r.stderr
    assert os.listdir(wdir / "box") == ["new"]


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry below `folder`: a file's bytes, None for a directory."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


@pytest.fixture
def update(wdir: Path) -> tuple[bytes, Path]:
    """An archive updating an existing tree (3,000 files in a/; in b/ a new subdirectory, a file
    where a directory was, a changed file), and that tree as it was before."""
    src = wdir / "src"
    (src / "a").mkdir(parents=True)
    for i in range(3000):
        (src / "a" / f"f{i:04}").write_bytes(b"new %d" % i)
    (src / "b" / "n").mkdir(parents=True)
    (src / "b" / "n" / "inside").write_bytes(b"new inside")
    (src / "b" / "g").write_bytes(b"new g")
    (src / "b" / "x").write_bytes(b"new x, was a directory")
    assert run_cli("tar", wdir / "update.catar", src).returncode == 0
    old = wdir / "target"
    (old / "a").mkdir(parents=True)
    for i in range(3000):
        (old / "a" / f"f{i:04}").write_bytes(b"old")
    (old / "b" / "x").mkdir(parents=True)
    (old / "b" / "x" / "y").write_bytes(b"old y")
    (old / "b" / "g").write_bytes(b"old g")
    return (wdir / "update.catar").read_bytes(), old


@pytest.mark.parametrize("broken", ["a", "b", "root"])
def test_a_broken_archive_changes_no_existing_directory_before_its_end(cli, wdir, update, broken):
    """In a target that exists, what goes into a directory waits under temporary names until the
    directory's goodbye table is checked: a bad table leaves that directory (and those above it)
    as they were, their entries and the files in them; directories finished before it are
    updated in full."""
    data, target = update
    before = contents(target)
    goodbyes = [o for o, s, k in records(data) if k == F.GOODBYE]  # post-order: a, b/n, b, root
    pos = goodbyes[{"a": 0, "b": 2, "root": 3}[broken]]
    bad = bytearray(data)
    bad[pos + 16 + 16] ^= 0xFF
    (wdir / "bad.catar").write_bytes(bytes(bad))
    assert_clean_error(cli("untar", wdir / "bad.catar", target), "GOODBYE")
    after = contents(target)
    assert temp_leftovers(target) == []
    if broken == "root":  # a/ and b/ ended before the failure: both whole, new
        assert after == contents(wdir / "src")
    else:
        assert set(after) == set(before)
        changed = {name for name in before if after[name] != before[name]}
        # a/ ended before b's failure: whole, new; b/ as it was (and nothing at all for a's)
        assert changed == (set() if broken == "a" else {f"a/f{i:04}" for i in range(3000)})
    (wdir / "good.catar").write_bytes(data)
    r = cli("untar", wdir / "good.catar", target)
    assert r.returncode == 0, r.stderr
    assert contents(target) == contents(wdir / "src")


def test_a_failure_after_a_directory_ended_keeps_its_metadata_and_restores_the_rest(cli, wdir):
    """The root's goodbye table is bad: ro/ (existing, read-only, ended before the failure) has its
    new file and the archive's mode and time; the root itself keeps its entries and its old time."""
    src, target = wdir / "src", wdir / "target"
    (src / "ro").mkdir(parents=True)
    (src / "ro" / "n").write_bytes(b"new")
    (src / "new").write_bytes(b"new at the root")
    os.chmod(src / "ro", 0o555)
    os.utime(src / "ro", (1_262_304_000, 1_262_304_000))  # 2010
    assert cli("tar", wdir / "a.catar", src).returncode == 0
    (target / "ro").mkdir(parents=True)
    (target / "ro" / "old").write_bytes(b"old")
    os.chmod(target / "ro", 0o555)
    for path in (target / "ro", target):
        os.utime(path, (946_684_800, 946_684_800))  # 2000
    data = bytearray((wdir / "a.catar").read_bytes())
    root_goodbye = len(data) - struct.unpack_from("<Q", data, len(data) - 16)[0]
    data[root_goodbye + 16] ^= 0x55
    (wdir / "bad.catar").write_bytes(bytes(data))
    assert_clean_error(cli("untar", wdir / "bad.catar", target), "GOODBYE")
    assert sorted(os.listdir(target)) == ["ro"] and os.stat(target).st_mtime == 946_684_800
    assert sorted(os.listdir(target / "ro")) == ["n", "old"]
    st = os.stat(target / "ro")
    assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime == 1_262_304_000
    os.chmod(target / "ro", 0o755)


def test_messages_stay_one_line_and_new_parents_go(cli, wdir):
    """A file name with a newline cannot forge a second error line; a new target whose parents
    were made for it leaves none of them after a failure; an mtime no filesystem holds is an
    archive error, not a traceback."""
    src = wdir / "src"
    src.mkdir()
    (src / "a\nError: forged").write_bytes(b"x")
    assert cli("tar", wdir / "a.catar", src).returncode == 0
    (wdir / "t").mkdir()
    (wdir / "t" / "a\nError: forged").write_bytes(b"old")
    assert_clean_error(cli("untar", "--overwrite=false", wdir / "a.catar", wdir / "t"), "a\\x0aError: forged")
    data = (wdir / "a.catar").read_bytes()
    (wdir / "cut.catar").write_bytes(data[:-30])
    assert_clean_error(cli("untar", wdir / "cut.catar", wdir / "p" / "q" / "new"), "truncated")
    assert not (wdir / "p").exists()
    bad = bytearray(data)
    struct.pack_into("<Q", bad, 16 + 40, 2**63 + 5)  # the root ENTRY's mtime
    (wdir / "bad.catar").write_bytes(bytes(bad))
    assert_clean_error(cli("untar", wdir / "bad.catar", wdir / "new"), "out of range")
