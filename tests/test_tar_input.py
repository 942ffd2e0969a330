"""`tar --input-format=tar`: a tar stream in, the catar of the tree it describes out, the same
bytes as `tar` of that tree on disk; and one clear error for each way a stream can be wrong."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import assert_clean_error, need, run_cli

FULL = "--with=best"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with every kind of node tar carries: files (one big), a hard link, a symlink,
    a fifo, a device (as root), an xattr, nanosecond times, an owner that is not us."""
    d = tmp_path_factory.mktemp("tarin") / "src"
    (d / "d" / "e").mkdir(parents=True)
    (d / "a").write_bytes(b"hello\n")
    (d / "d" / "big").write_bytes(os.urandom(3 << 20))
    (d / "d" / "e" / "empty").write_bytes(b"")
    os.link(d / "a", d / "hard")
    os.symlink("a", d / "link")
    os.mkfifo(d / "fifo")
    if os.geteuid() == 0:
        os.mknod(d / "null", 0o620 | 0o020000, os.makedev(1, 3))
        os.chown(d / "d" / "big", 1234, 5678)
    with contextlib.suppress(OSError):  # a filesystem without user xattrs: the rest still counts
        os.setxattr(d / "a", "user.colour", b"blue\x00\xff")
    os.utime(d / "d" / "big", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.chmod(d / "d" / "e", 0o750)
    return d


def gnu_tar(tree: Path, out: Path, *extra: str) -> Path:
    need(shutil.which("tar") is not None, "GNU tar not installed")
    subprocess.run(["tar", "--xattrs", "--format=pax", *extra, "-C", tree, "-cf", out, "."], check=True)
    return out


def test_a_gnu_tar_stream_gives_the_catar_of_its_tree(tree: Path, tmp_path: Path):
    stream = gnu_tar(tree, tmp_path / "in.tar")
    for features in ([], [FULL]):
        assert run_cli("tar", *features, tmp_path / "disk.catar", tree).returncode == 0
        r = run_cli("tar", *features, "--input-format=tar", tmp_path / "in.catar", stream)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "in.catar").read_bytes() == (tmp_path / "disk.catar").read_bytes(), features


def test_compressed_stdin_and_index_output(tree: Path, tmp_path: Path):
    """gzip'd on stdin; with -i the chunks and the .caidx equal those made from the tree on disk."""
    stream = gnu_tar(tree, tmp_path / "in.tar")
    packed = gzip.compress(stream.read_bytes())
    r = run_cli("tar", "--input-format=tar", "-", "-", input=packed)
    assert r.returncode == 0, r.stderr
    assert run_cli("tar", tmp_path / "disk.catar", tree).returncode == 0
    assert r.stdout == (tmp_path / "disk.catar").read_bytes()
    assert run_cli("tar", "-i", "-s", tmp_path / "s1", tmp_path / "disk.caidx", tree).returncode == 0
    r = run_cli("tar", "-i", "-s", tmp_path / "s2", "--input-format=tar", tmp_path / "in.caidx", "-",
                input=packed)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "in.caidx").read_bytes() == (tmp_path / "disk.caidx").read_bytes()
    assert sorted(p.name for p in (tmp_path / "s1").rglob("*.cacnk")) == \
        sorted(p.name for p in (tmp_path / "s2").rglob("*.cacnk"))


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_500_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tar(path: Path, members: list[tuple]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return path


def test_entries_in_any_order_and_repeated_give_the_sorted_tree(tmp_path: Path):
    """Children before their directory, directories interleaved, a path listed twice (the later
    wins, as tar extraction does): the catar is that of the tree the stream leaves on disk."""
    shuffled = write_tar(tmp_path / "shuffled.tar", [
        member("./b/y", data=b"old"), member("./a/x", data=b"x"), member("./b/y", data=b"new y"),
        member("./", tarfile.DIRTYPE), member("./b", tarfile.DIRTYPE, mode=0o700),
        member("./a", tarfile.DIRTYPE), member("./c", tarfile.SYMTYPE, linkname="a/x")])
    ordered = write_tar(tmp_path / "ordered.tar", [
        member("./", tarfile.DIRTYPE), member("./a", tarfile.DIRTYPE), member("./a/x", data=b"x"),
        member("./b", tarfile.DIRTYPE, mode=0o700), member("./b/y", data=b"new y"),
        member("./c", tarfile.SYMTYPE, linkname="a/x")])
    out = []
    for stream in (shuffled, ordered):
        r = run_cli("tar", FULL, "--input-format=tar", "-", stream)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout)
    assert out[0] == out[1]
    r = run_cli("untar", "--no-same-owner", "-", tmp_path / "x", input=out[0])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "b" / "y").read_bytes() == b"new y"
    assert os.readlink(tmp_path / "x" / "c") == "a/x"
    assert (tmp_path / "x" / "b").stat().st_mode & 0o777 == 0o700


def test_a_stream_without_a_root_entry_needs_tar_add_root(tmp_path: Path):
    """`git archive` and `tar -cf x.tar dir1 dir2` list no root: refused with the way out named;
    --tar-add-root makes one (mode 0755), and missing parents are made the same way."""
    stream = write_tar(tmp_path / "noroot.tar", [member("a/b/c", data=b"deep"), member("top", data=b"t")])
    assert_clean_error(run_cli("tar", "--input-format=tar", tmp_path / "x.catar", stream),
                       "no root directory entry", "--tar-add-root")
    assert not (tmp_path / "x.catar").exists()
    r = run_cli("tar", "--input-format=tar", "--tar-add-root", tmp_path / "x.catar", stream)
    assert r.returncode == 0, r.stderr
    assert run_cli("untar", "--no-same-owner", tmp_path / "x.catar", tmp_path / "x").returncode == 0
    assert (tmp_path / "x" / "a" / "b" / "c").read_bytes() == b"deep"
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o755
    assert_clean_error(run_cli("tar", "--tar-add-root", tmp_path / "y.catar", tmp_path / "x"),
                       "--tar-add-root only applies to --input-format=tar")


@pytest.mark.parametrize("case", ["parent path", "hard link to nothing", "not tar", "empty", "missing",
                                  "cut at a member", "cut in a file", "a directory"])
def test_a_bad_stream_is_one_clear_error_and_no_output(tree: Path, tmp_path: Path, case: str):
    good = gnu_tar(tree, tmp_path / "good.tar").read_bytes()
    sources = {
        "parent path": (lambda p: write_tar(p, [member("./", tarfile.DIRTYPE), member("../evil", data=b"x")]),
                        ["outside the archive"]),
        "hard link to nothing": (lambda p: write_tar(p, [member("./", tarfile.DIRTYPE),
                                                         member("l", tarfile.LNKTYPE, linkname="nowhere")]),
                                 ["hard link to nowhere"]),
        "not tar": (lambda p: p.write_bytes(os.urandom(4096)) and p, ["not a tar stream"]),
        "empty": (lambda p: p.write_bytes(b"") or p, ["not a tar stream"]),
        "missing": (lambda p: p, ["no such file"]),
        "cut at a member": (lambda p: p.write_bytes(good[:1536]) and p, ["end-of-archive", "truncated"]),
        "cut in a file": (lambda p: p.write_bytes(good[:len(good) // 2]) and p, ["tar stream"]),
        "a directory": (lambda p: p.mkdir() or p, ["Is a directory"]),
    }
    make, fragments = sources[case]
    source = make(tmp_path / "in.tar")
    out = tmp_path / "out.catar"
    out.write_bytes(b"the previous archive")
    assert_clean_error(run_cli("tar", "--input-format=tar", out, source), *fragments)
    assert out.read_bytes() == b"the previous archive"  # written to a temporary name, never replaced


def test_desync_gnu_tar_round_trip(desync_data: Path, tmp_path: Path):
    """desync's complex.gnu-tar (made by its untar from complex.catar) back to a catar and out as
    GNU tar again: every member the same (names, types, permissions, owners, times, sizes, contents,
    link targets, devices; Go's writer leaves its FileMode type bits in the mode field)."""
    original = desync_data / "testdata" / "complex.gnu-tar"
    r = run_cli("tar", "--input-format=tar", tmp_path / "c.catar", original)
    assert r.returncode == 0, r.stderr
    r = run_cli("untar", "--output-format=gnu-tar", tmp_path / "c.catar", tmp_path / "c.tar")
    assert r.returncode == 0, r.stderr

    def members(path: Path) -> dict[str, tuple]:
        with tarfile.open(path) as tar:
            return {m.name.removeprefix("./") or ".": (
                m.type, m.mode & 0o7777, m.uid, m.gid, int(m.mtime), m.size, m.linkname, m.devmajor,
                m.devminor, tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}
    assert members(tmp_path / "c.tar") == members(original)
