"""mount-index through the real FUSE (fuse3, as root): a blob as a file, an archive index as a tree."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import need, run_cli
from procutil import HANG_GUARD

from pydesync.index import read_index


def fuse_usable() -> bool:
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError):
        return False
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@pytest.fixture(autouse=True)
def _needs_fuse():
    need(fuse_usable(), "mount-index needs root, /dev/fuse, fuse3 and mfusepy (apt-get install fuse3; "
                        "pip install 'pydesync[mount]')")


def is_mount(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@contextmanager
def mounted(*args: object, mountpoint: Path, wait_for: str | None = None) -> Iterator[subprocess.Popen]:
    mountpoint.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "pydesync", "mount-index", *map(str, args), str(mountpoint)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not is_mount(mountpoint) or (wait_for and not (mountpoint / wait_for).exists()):
            if proc.poll() is not None:
                raise AssertionError(f"mount-index exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(HANG_GUARD)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mount-blob")
    rng = random.Random(3)
    data = bytearray(rng.randbytes(6 << 20))
    data[2 << 20:3 << 20] = bytes(1 << 20)
    (d / "image").write_bytes(data)
    r = run_cli("make", "-s", d / "store", d / "image.caibx", d / "image")
    assert r.returncode == 0, r.stderr
    return d


def test_blob_whole_and_random_reads(blob_store: Path, tmp_path: Path):
    expected = (blob_store / "image").read_bytes()
    with mounted("-s", blob_store / "store", blob_store / "image.caibx", mountpoint=tmp_path / "m",
                 wait_for="image"):
        target = tmp_path / "m" / "image"
        st = target.stat()
        assert st.st_size == len(expected) and stat.S_IMODE(st.st_mode) == 0o444
        assert os.listdir(tmp_path / "m") == ["image"]
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(expected).digest()
        rng = random.Random(1)
        with open(target, "rb") as f:
            for _ in range(200):
                at = rng.randrange(0, len(expected))
                n = rng.randrange(1, 300_000)
                f.seek(at)
                assert f.read(n) == expected[at:at + n]
        with pytest.raises(OSError) as refused:
            open(target, "r+b")  # noqa: SIM115
        assert refused.value.errno in (errno.EROFS, errno.EACCES)


def test_many_concurrent_readers(blob_store: Path, tmp_path: Path):
    expected = (blob_store / "image").read_bytes()
    failures: list[str] = []
    with mounted("-s", blob_store / "store", blob_store / "image.caibx", mountpoint=tmp_path / "m",
                 wait_for="image"):
        def reader(seed: int) -> None:
            rng = random.Random(seed)
            with open(tmp_path / "m" / "image", "rb") as f:
                for _ in range(60):
                    at = rng.randrange(0, len(expected))
                    n = rng.randrange(1, 200_000)
                    if os.pread(f.fileno(), n, at) != expected[at:at + n]:
                        failures.append(f"{seed}: {at}+{n}")
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def test_a_second_read_is_served_by_the_page_cache(blob_store: Path, tmp_path: Path):
    """The content never changes, so the kernel keeps what was read across opens (kernel_cache):
    with the store gone, the whole file still reads back. (The mount's own chunk cache holds 64
    chunks, fewer than this blob's, so its first chunks could only come from the kernel.)"""
    store = tmp_path / "store"
    shutil.copytree(blob_store / "store", store)
    expected = (blob_store / "image").read_bytes()
    assert len(read_index(str(blob_store / "image.caibx")).chunks) > 64
    with mounted("-s", store, blob_store / "image.caibx", mountpoint=tmp_path / "m", wait_for="image"):
        target = tmp_path / "m" / "image"
        assert target.read_bytes() == expected
        shutil.rmtree(store)
        assert target.read_bytes() == expected


def test_missing_chunk_is_eio_for_its_range_only(blob_store: Path, tmp_path: Path):
    store = tmp_path / "store"
    shutil.copytree(blob_store / "store", store)
    index = read_index(str(blob_store / "image.caibx"))
    victim = index.chunks[3]
    (store / victim.id.hex()[:4] / f"{victim.id.hex()}.cacnk").unlink()
    expected = (blob_store / "image").read_bytes()
    with mounted("-s", store, blob_store / "image.caibx", mountpoint=tmp_path / "m",
                 wait_for="image") as proc:
        fd = os.open(tmp_path / "m" / "image", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as failed:
                os.pread(fd, 100, victim.start + 10)
            assert failed.value.errno == errno.EIO
            other = index.chunks[10]
            assert os.pread(fd, other.size, other.start) == expected[other.start:other.end]
        finally:
            os.close(fd)
    assert victim.id.hex() in proc.stderr.read().decode()  # type: ignore[union-attr]


def test_sigterm_unmounts(blob_store: Path, tmp_path: Path):
    with mounted("-s", blob_store / "store", blob_store / "image.caibx", mountpoint=tmp_path / "m",
                 wait_for="image") as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_GUARD) == 0
        assert not is_mount(tmp_path / "m")


def test_copy_on_read_state_starts_warm(blob_store: Path, tmp_path: Path):
    """Chunks read once land in the cor file; with the saved state a later mount serves them
    even from an empty store."""
    expected = (blob_store / "image").read_bytes()
    cor, state = tmp_path / "image.cor", tmp_path / "image.state"
    with mounted("-s", blob_store / "store", "--cor-file", cor, "--cor-state-save", state,
                 blob_store / "image.caibx", mountpoint=tmp_path / "m", wait_for="image"), \
            open(tmp_path / "m" / "image", "rb") as f:
        assert f.read(1 << 20) == expected[:1 << 20]
    assert state.exists() and any(state.read_bytes())
    (tmp_path / "empty").mkdir()
    with mounted("-s", tmp_path / "empty", "--cor-file", cor, "--cor-state-save", state,
                 blob_store / "image.caibx", mountpoint=tmp_path / "m2", wait_for="image"), \
            open(tmp_path / "m2" / "image", "rb") as f:
        assert f.read(1 << 20) == expected[:1 << 20]


def test_archive_index_as_a_tree(tmp_path: Path):
    """A .caidx mounted: every entry with its type, mode, owner, size, mtime, symlink target,
    xattrs and content, as in the source tree."""
    src = tmp_path / "src"
    (src / "dir" / "deep").mkdir(parents=True)
    (src / "dir" / "deep" / "f.bin").write_bytes(random.Random(4).randbytes(700_000))
    (src / "small.txt").write_text("hello\n")
    (src / "empty").write_bytes(b"")
    os.symlink("dir/deep/f.bin", src / "link")
    os.chmod(src / "small.txt", 0o640)
    os.setxattr(src / "small.txt", "user.note", b"kept")
    os.utime(src / "small.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    r = run_cli("tar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", src)
    assert r.returncode == 0, r.stderr
    mnt = tmp_path / "m"
    with mounted("-s", tmp_path / "store", tmp_path / "t.caidx", mountpoint=mnt, wait_for="small.txt"):
        for root, dirs, files in os.walk(src):
            rel = Path(root).relative_to(src)
            assert sorted(os.listdir(mnt / rel)) == sorted(dirs + files)
            for name in dirs + files:
                a, b = os.lstat(Path(root) / name), os.lstat(mnt / rel / name)
                assert (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid), name
                assert a.st_mtime_ns == b.st_mtime_ns, name
                if stat.S_ISLNK(a.st_mode):
                    assert os.readlink(Path(root) / name) == os.readlink(mnt / rel / name)
                elif stat.S_ISREG(a.st_mode):
                    assert a.st_size == b.st_size
                    assert (Path(root) / name).read_bytes() == (mnt / rel / name).read_bytes()
        assert os.getxattr(mnt / "small.txt", "user.note") == b"kept"


def test_seed_serves_chunks_it_holds(blob_store: Path, tmp_path: Path):
    """With the blob itself as seed and an empty store, every read comes from the seed (checked)."""
    expected = (blob_store / "image").read_bytes()
    (tmp_path / "empty").mkdir()
    with mounted("-s", tmp_path / "empty", "--seed", f"{blob_store / 'image.caibx'}:{blob_store / 'image'}",
                 blob_store / "image.caibx", mountpoint=tmp_path / "m", wait_for="image"):
        assert (tmp_path / "m" / "image").read_bytes() == expected
