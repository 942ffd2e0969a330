"""Concurrency and resource limits: two makes into one store, prune during an extract, a full disk,
a read-only store, too few file descriptors. Clear errors, sound stores, no partial files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import assert_clean_error, need, run_cli
from faultserver import Gate
from procutil import HANG_GUARD

from pydesync.codec import decompress


def random_file(path: Path, mib: int, seed: int) -> bytes:
    rng = random.Random(seed)
    data = b"".join(rng.randbytes(1 << 20) for _ in range(mib))
    path.write_bytes(data)
    return data


def store_is_sound(store: Path) -> None:
    for path in store.glob("*/*.cacnk"):
        assert hashlib.new("sha512_256", decompress(path.read_bytes())).hexdigest() == path.name.split(".")[0]


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    need(os.geteuid() == 0, "mounting a tmpfs needs root")
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    need(r.returncode == 0, f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_two_makes_into_one_store_at_once(tmp_path: Path):
    shared = random.Random(9).randbytes(4 << 20)
    (tmp_path / "a").write_bytes(shared + random.Random(1).randbytes(4 << 20))
    (tmp_path / "b").write_bytes(random.Random(2).randbytes(4 << 20) + shared)
    procs = [subprocess.Popen([sys.executable, "-m", "pydesync", "make", "-s", str(tmp_path / "store"),
                               str(tmp_path / f"{n}.caibx"), str(tmp_path / n)],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in ("a", "b")]
    for p in procs:
        assert p.wait(HANG_GUARD) == 0, p.stderr.read()  # type: ignore[union-attr]
    store_is_sound(tmp_path / "store")
    for n in ("a", "b"):
        r = run_cli("extract", "-s", tmp_path / "store", tmp_path / f"{n}.caibx", tmp_path / f"{n}.out")
        assert r.returncode == 0 and (tmp_path / f"{n}.out").read_bytes() == (tmp_path / n).read_bytes()


def test_prune_during_an_extract(tmp_path: Path):
    """Documented outcome: the extract either completes with the right bytes or stops with one
    error naming a missing chunk, leaving no output; it never writes wrong data."""
    random_file(tmp_path / "a", 24, 1)
    random_file(tmp_path / "b", 1, 2)
    for n in ("a", "b"):
        r = run_cli("make", "-s", tmp_path / "store", tmp_path / f"{n}.caibx", tmp_path / n)
        assert r.returncode == 0, r.stderr
    argv = [sys.executable, "-m", "pydesync", "extract", "-n", "1", "-s", str(tmp_path / "store"),
            str(tmp_path / "a.caibx"), str(tmp_path / "out")]
    extract = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = run_cli("prune", "-y", "-s", tmp_path / "store", tmp_path / "b.caibx")
    assert r.returncode == 0, r.stderr
    _, err = extract.communicate(timeout=HANG_GUARD)
    if extract.returncode == 0:
        assert (tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and "missing" in lines[0], err
        assert not (tmp_path / "out").exists()
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".out"))
    assert left in ([], [".out.partial", ".out.partial.caibx"])  # (a failed run's partial, to resume)
    if extract.returncode == 0:
        assert left == []


def test_full_disk(tmp_path: Path):
    data = random_file(tmp_path / "big", 24, 3)
    with small_tmpfs(tmp_path / "small", "8m") as small:
        r = run_cli("make", "-s", small / "store", small / "big.caibx", tmp_path / "big")
        assert_clean_error(r, "No space left on device")
        assert not (small / "big.caibx").exists()
        store_is_sound(small / "store")
        assert not list((small / "store").glob("*/.tmp*"))
        r = run_cli("make", "-s", tmp_path / "store", tmp_path / "big.caibx", tmp_path / "big")
        assert r.returncode == 0
        r = run_cli("extract", "-s", tmp_path / "store", tmp_path / "big.caibx", small / "out")
        assert_clean_error(r, "No space left on device")
        # no output and no stray file: only the partial with its index, for a rerun once there is room
        assert sorted(os.listdir(small)) in (["store"], [".out.partial", ".out.partial.caibx", "store"])
        assert not (small / "out").exists()
    assert len(data) == 24 << 20


def test_tar_and_untar_onto_a_full_disk(tmp_path: Path):
    """An archive larger than the disk: one ENOSPC line and no archive. A tree larger than the
    disk: one ENOSPC line naming the file that did not fit; into a new target nothing is left,
    into an existing one it is as it was (what went into a directory that existed waited there
    under temporary names, now removed, for a directory end that never came)."""
    tree = tmp_path / "tree" / "sub"
    tree.mkdir(parents=True)
    files = {f"f{i}": random.Random(i).randbytes(2 << 20) for i in range(8)}
    for name, content in files.items():
        (tree / name).write_bytes(content)
    assert run_cli("tar", tmp_path / "t.catar", tmp_path / "tree").returncode == 0
    with small_tmpfs(tmp_path / "small", "7m") as small:
        r = run_cli("tar", small / "t.catar", tmp_path / "tree")
        assert_clean_error(r, "No space left on device")
        assert os.listdir(small) == []
        r = run_cli("untar", tmp_path / "t.catar", small / "new")
        assert_clean_error(r, "No space left on device", str(small / "new" / "sub"))
        assert os.listdir(small) == []
        (small / "out" / "sub").mkdir(parents=True)
        (small / "out" / "sub" / "f1").write_bytes(b"old")
        r = run_cli("untar", tmp_path / "t.catar", small / "out")
        assert_clean_error(r, "No space left on device", str(small / "out" / "sub"))
        assert os.listdir(small / "out") == ["sub"]
        assert os.listdir(small / "out" / "sub") == ["f1"]
        assert (small / "out" / "sub" / "f1").read_bytes() == b"old"


def test_read_only_store(tmp_path: Path):
    random_file(tmp_path / "a", 2, 4)
    with small_tmpfs(tmp_path / "ro", "64m") as ro:
        assert run_cli("make", "-s", ro / "store", tmp_path / "a.caibx", tmp_path / "a").returncode == 0
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        need(r.returncode == 0, f"cannot remount read-only: {r.stderr.strip()}")
        random_file(tmp_path / "b", 2, 5)
        assert_clean_error(run_cli("make", "-s", ro / "store", tmp_path / "b.caibx", tmp_path / "b"),
                           "not writable")
        assert not (tmp_path / "b.caibx").exists()
        r = run_cli("extract", "-s", ro / "store", tmp_path / "a.caibx", tmp_path / "out")  # reads still work
        assert r.returncode == 0 and (tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()


def test_too_many_open_files(tmp_path: Path, fault):
    """Descriptors run out mid-run: extract (-n 10) against a store that holds every request has
    ten connections open; then its descriptor limit drops below what it holds and the store cuts
    those connections, so every reconnection fails. One clear error, no output."""
    random_file(tmp_path / "a", 4, 6)
    assert run_cli("make", "-s", tmp_path / "store", tmp_path / "a.caibx", tmp_path / "a").returncode == 0
    gate = Gate(allow=0)
    server = fault(tmp_path / "store", gate)
    argv = [sys.executable, "-m", "pydesync", "extract", "-n", "10", "-b", "10ms", "-s", server.url,
            str(tmp_path / "a.caibx"), str(tmp_path / "out")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    gate.wait_for_waiting(10)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (3, 3))
    gate.release(drop=True)
    _, err = proc.communicate(timeout=HANG_GUARD)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Too many open files" in lines[0], err
    assert lines[0].startswith("Error: ")
    assert not [n for n in os.listdir(tmp_path) if "out" in n]
