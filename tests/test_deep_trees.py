"""Trees casync can archive that once broke the walk: paths past PATH_MAX (4096 bytes) and
thousands of levels; the walk holds a bounded number of descriptors and recurses nowhere."""

from __future__ import annotations

import contextlib
import filecmp
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli


def chain(root: Path, levels: int, name: str) -> int:
    """`levels` nested directories below root (made through descriptors: no path grows); returns
    an open descriptor of the deepest, for the caller to fill and close."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(levels):
        entry = name % i if "%" in name else name
        os.mkdir(entry, dir_fd=fd)
        deeper = os.open(entry, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    return fd


@pytest.fixture(scope="module")
def long_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 levels of 120-byte names (about 4.9 kB of path), a file with an xattr and a symlink at
    the bottom."""
    root = tmp_path_factory.mktemp("long") / "tree"
    fd = chain(root, 40, "L%03d" + "x" * 116)
    try:
        os.symlink("target", "link", dir_fd=fd)
        f = os.open("file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"at the bottom\n")
        with contextlib.suppress(OSError):
            os.setxattr(f, "user.deep", b"yes")
        os.close(f)
    finally:
        os.close(fd)
    return root


def remove_deep(path: Path) -> None:
    """Remove a tree too deep for shutil.rmtree (recursive in Python 3.11; pytest's clean-up of old
    temporary directories uses it): GNU rm walks any depth."""
    subprocess.run(["rm", "-rf", "--", str(path)], check=True)


@pytest.fixture(scope="module")
def deep_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """3,000 levels (about 6 kB of path), a file at the bottom."""
    root = tmp_path_factory.mktemp("deep") / "tree"
    fd = chain(root, 3000, "d")
    try:
        f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"x")
        os.close(f)
    finally:
        os.close(fd)
    yield root
    remove_deep(root)


def test_paths_past_path_max_archive_as_casync_does(long_tree: Path, casync: str, tmp_path: Path):
    subprocess.run([casync, "make", tmp_path / "casync.catar", long_tree], check=True, capture_output=True)
    r = run_cli("tar", tmp_path / "ours.catar", long_tree)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ours.catar").read_bytes() == (tmp_path / "casync.catar").read_bytes()
    for command in ("digest", "mtree"):
        r = run_cli(command, long_tree)
        assert r.returncode == 0, (command, r.stderr)
    r = run_cli("digest", tmp_path / "casync.catar")
    assert r.returncode == 0 and r.stdout == run_cli("digest", long_tree).stdout


def test_thousands_of_levels_round_trip(deep_tree: Path, tmp_path: Path):
    try:
        round_trip(deep_tree, tmp_path)
    finally:
        remove_deep(tmp_path / "out")


def round_trip(deep_tree: Path, tmp_path: Path) -> None:
    r = run_cli("tar", tmp_path / "a.catar", deep_tree)
    assert r.returncode == 0, r.stderr[-500:]
    r = run_cli("untar", tmp_path / "a.catar", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-500:]
    r = run_cli("tar", tmp_path / "b.catar", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-500:]
    assert (tmp_path / "a.catar").read_bytes() == (tmp_path / "b.catar").read_bytes()
    digests = {run_cli("digest", p).stdout for p in (deep_tree, tmp_path / "a.catar")}
    assert len(digests) == 1 and b"" not in digests
    r = run_cli("mtree", deep_tree)
    assert r.returncode == 0 and r.stdout.count(b"\n") == 3000 + 3, r.stderr[-500:]


def few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def run_bounded(*args: str | os.PathLike[str]) -> tuple[int, str, int]:
    """Run the command line with 128 descriptors allowed; returns (exit status, stderr, peak
    resident memory in MiB) of that process alone."""
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=few_descriptors)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, usage.ru_maxrss // 1024


LEVELS = 100_000
BOUNDED_MIB = 600  # each step holds about 130 MiB at this depth; a path kept per level needs 11 GiB


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in tmpfs where there is one (a deep tree costs a second there, tens on
    a disk), else tmp_path; removed afterwards at any depth."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="pydesync-deep-", dir=shm))
    try:
        yield path
    finally:
        remove_deep(path)


def test_a_hundred_thousand_levels_round_trip_in_bounded_memory_and_descriptors(memory_dir: Path):
    """tar, untar and tar again, byte-identical, each with 128 descriptors and memory linear in the
    depth; a truncated archive of that depth into a new target leaves nothing."""
    os.close(chain(memory_dir / "tree", LEVELS, "d"))
    for args in (("tar", memory_dir / "a.catar", memory_dir / "tree"),
                 ("untar", memory_dir / "a.catar", memory_dir / "out"),
                 ("tar", memory_dir / "b.catar", memory_dir / "out")):
        status, stderr, mib = run_bounded(*args)
        assert status == 0 and mib < BOUNDED_MIB, (args[0], status, mib, stderr[-500:])
        assert len(stderr) < 1000, stderr[:300]  # one warning (casync's depth), the path cut short
    assert filecmp.cmp(memory_dir / "a.catar", memory_dir / "b.catar", shallow=False)
    for name in ("tree", "out", "b.catar"):
        remove_deep(memory_dir / name)
    data = (memory_dir / "a.catar").read_bytes()
    (memory_dir / "cut.catar").write_bytes(data[:len(data) // 5])  # 36,000 levels made, then the end
    status, stderr, _ = run_bounded("untar", memory_dir / "cut.catar", memory_dir / "new")
    assert status == 1 and "truncated" in stderr and stderr.count("\n") == 1, stderr[-500:]
    assert sorted(p.name for p in memory_dir.iterdir()) == ["a.catar", "cut.catar"]


@pytest.mark.parametrize("command", ["tar", "digest"])
def test_the_walk_holds_few_descriptors_whatever_the_depth(deep_tree: Path, tmp_path: Path, command: str):
    """3,000 levels walked with 128 descriptors allowed (a walk holding one per level needs 3,000)."""
    args = [tmp_path / "x.catar", deep_tree] if command == "tar" else [deep_tree]
    proc = subprocess.run([sys.executable, "-m", "pydesync", command, *map(str, args)], capture_output=True,
                          stdin=subprocess.DEVNULL, preexec_fn=few_descriptors)
    assert proc.returncode == 0, proc.stderr[-500:]


@pytest.mark.parametrize("with_file", [False, True])
def test_an_archive_casync_cannot_read_is_a_warning(casync: str, tmp_path: Path, with_file: bool):
    """casync reads 64 nodes deep (the root included): 63 nested directories are fine, a file in
    the deepest is one too many. Our tar says so, naming the path, exactly where casync fails."""
    fd = chain(tmp_path / "tree", 63, "d")
    if with_file:
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    r = run_cli("tar", tmp_path / "x.catar", tmp_path / "tree")
    assert r.returncode == 0, r.stderr
    listed = subprocess.run([casync, "list", tmp_path / "x.catar"], capture_output=True)
    assert (listed.returncode != 0) == with_file, listed.stderr
    if with_file:
        assert r.stderr.startswith("Warning: ") and "/d/f is 64 levels deep" in r.stderr, r.stderr
        assert "casync cannot read" in r.stderr
    else:
        assert r.stderr == ""


def test_deep_targets_with_a_file_per_level(tmp_path: Path):
    """200 levels with a file each: into a new target with 128 descriptors allowed (each finished
    directory holds one until its files are written: that queue is bounded too); and into 200
    existing levels reached through a symlink, from an archive cut short: every level is as it
    was, the ones whose descriptors were closed for depth included."""
    src = tmp_path / "src"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for name in ("src", "target"):
        os.mkdir(name, dir_fd=fd)
    os.close(fd)
    for root, with_files in ((src, True), (tmp_path / "target", False)):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(200):
            if with_files:
                os.close(os.open("a", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            os.mkdir("d", dir_fd=fd)
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(fd)
    (tmp_path / "link").symlink_to("target")
    assert run_cli("tar", tmp_path / "a.catar", src).returncode == 0
    status, stderr, _ = run_bounded("untar", tmp_path / "a.catar", tmp_path / "new")
    assert status == 0, stderr[-300:]
    remove_deep(tmp_path / "new")
    data = (tmp_path / "a.catar").read_bytes()
    (tmp_path / "cut.catar").write_bytes(data[:len(data) * 6 // 10])
    r = run_cli("untar", tmp_path / "cut.catar", tmp_path / "link")
    assert r.returncode == 1 and "truncated" in r.stderr, r.stderr[-300:]
    left = [p for p in (tmp_path / "target").rglob("*") if p.name != "d"]
    assert left == []
