"""kill -9 at random moments: a store never holds a chunk whose content does not match its name, a
target is the old or the new file, and running the command again completes.

Each test kills a real process (SIGKILL, so no clean-up of ours runs) at a random time, many times
(PYDESYNC_CRASH_ROUNDS, default 8; PYDESYNC_CRASH_SEED varies the moments),
then checks the invariants with pydesync's own verify and by comparing files.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from procutil import free_port, stop, wait_listening

from pydesync.codec import decompress
from pydesync.index import read_index

# The suite's rounds; a long campaign: PYDESYNC_CRASH_ROUNDS=200 PYDESYNC_CRASH_SEED=7 pytest this file.
ROUNDS = int(os.environ.get("PYDESYNC_CRASH_ROUNDS", "8"))
SEED = int(os.environ.get("PYDESYNC_CRASH_SEED", "0"))


def pydesync(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pydesync", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_at_random(proc: subprocess.Popen, rng: random.Random, longest: float) -> bool:
    """SIGKILL after a random delay; True if it was still running (so really interrupted). A run
    that ended before must have succeeded."""
    time.sleep(rng.uniform(0.02, longest))
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive or proc.returncode == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
    return alive


def store_is_sound(store: Path) -> None:
    """Every chunk file decodes to data whose SHA512/256 is its name (temporary files aside)."""
    for path in store.glob("*/*.cacnk"):
        data = decompress(path.read_bytes())
        assert hashlib.new("sha512_256", data).hexdigest() == path.name.split(".")[0], path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = random.Random(SEED + 3)
    for name in ("a", "b"):
        with open(tmp_path / name, "wb") as f:
            for _ in range(32):
                f.write(rng.randbytes(1 << 20))
    return tmp_path


def test_make_killed_leaves_a_sound_store_and_completes(data: Path):
    rng = random.Random(SEED + 1)
    killed = 0
    for _ in range(ROUNDS):
        was_killed = kill_at_random(pydesync("make", "-s", data / "store", data / "a.caibx", data / "a"), rng,
                                    0.6)
        killed += was_killed
        if (data / "store").exists():
            store_is_sound(data / "store")
            if not was_killed:  # it finished: start the next round from nothing again
                shutil.rmtree(data / "store")
    assert killed >= 2
    r = run_cli("make", "-s", data / "store", data / "a.caibx", data / "a")
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", "-s", data / "store").returncode == 0
    r = run_cli("extract", "-s", data / "store", data / "a.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "a").read_bytes()


def test_extract_killed_leaves_old_or_new_and_completes(data: Path):
    for name in ("a", "b"):
        assert run_cli("make", "-s", data / "store", data / f"{name}.caibx", data / name).returncode == 0
    old, new = (data / "a").read_bytes(), (data / "b").read_bytes()
    rng = random.Random(SEED + 2)
    shutil.copy(data / "a", data / "target")
    for _ in range(ROUNDS):
        kill_at_random(pydesync("extract", "-s", data / "store", data / "b.caibx", data / "target"), rng, 1.0)
        assert (data / "target").read_bytes() in (old, new)
        shutil.copy(data / "a", data / "target")
    r = run_cli("extract", "-s", data / "store", data / "b.caibx", data / "target")
    assert r.returncode == 0 and (data / "target").read_bytes() == new


def test_prune_killed_keeps_what_is_referenced(data: Path):
    for name in ("a", "b"):
        assert run_cli("make", "-s", data / "store", data / f"{name}.caibx", data / name).returncode == 0
    keep = {c.id.hex() for c in read_index(str(data / "b.caibx"))}
    rng = random.Random(SEED + 4)
    for _ in range(ROUNDS // 2):
        kill_at_random(pydesync("prune", "-y", "-s", data / "store", data / "b.caibx"), rng, 0.8)
        names = {p.name.split(".")[0] for p in (data / "store").glob("*/*.cacnk")}
        assert keep <= names
        store_is_sound(data / "store")
    assert run_cli("prune", "-y", "-s", data / "store", data / "b.caibx").returncode == 0
    assert {p.name.split(".")[0] for p in (data / "store").glob("*/*.cacnk")} == keep
    r = run_cli("extract", "-s", data / "store", data / "b.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "b").read_bytes()


def test_chunk_server_killed_during_uploads(data: Path):
    """make through a writable chunk-server that is killed and restarted: its store stays sound and
    the upload completes on the last run."""
    store = data / "served"
    store.mkdir()
    rng = random.Random(SEED + 5)
    for round_ in range(ROUNDS // 2 + 1):
        port = free_port()
        server = pydesync("chunk-server", "-w", "-s", store, "-l", f"127.0.0.1:{port}")
        assert wait_listening(server, port), server.stderr.read().decode()  # type: ignore[union-attr]
        client = pydesync("make", "-s", f"http://127.0.0.1:{port}/", data / "a.caibx", data / "a")
        if round_ < ROUNDS // 2:
            time.sleep(rng.uniform(0.2, 1.0))
            server.send_signal(signal.SIGKILL)
            server.wait()
            client.wait(60)
        else:
            assert client.wait(120) == 0
            stop(server)
        store_is_sound(store)
    r = run_cli("extract", "-s", store, data / "a.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "a").read_bytes()
    assert not [n for n in os.listdir(data) if n.startswith(".out")]


def test_tar_index_killed_leaves_a_sound_store_and_completes(tmp_path: Path):
    """tar -i of a tree into a store, killed at random moments: the store stays sound, no .caidx
    appears half-written, and the rerun gives an index that untars to the tree."""
    tree = tmp_path / "tree"
    rng = random.Random(SEED + 6)
    for d in range(6):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(6):
            (tree / f"d{d}" / f"f{f}").write_bytes(rng.randbytes(rng.randrange(1, 1 << 20)))
    killed = 0
    for _ in range(ROUNDS):
        tar = pydesync("tar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", tree)
        was_killed = kill_at_random(tar, rng, 0.6)
        killed += was_killed
        if (tmp_path / "store").exists():
            store_is_sound(tmp_path / "store")
        if was_killed:
            assert not (tmp_path / "t.caidx").exists() or read_index(str(tmp_path / "t.caidx"))
        else:
            shutil.rmtree(tmp_path / "store")
            (tmp_path / "t.caidx").unlink()
    assert killed >= 2
    r = run_cli("tar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", tree)
    assert r.returncode == 0, r.stderr
    r = run_cli("untar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for d in range(6):
        for f in range(6):
            name = Path(f"d{d}") / f"f{f}"
            assert (tmp_path / "out" / name).read_bytes() == (tree / name).read_bytes()


def test_temporary_files_of_killed_runs_are_removed_by_the_next(data: Path):
    """kill -9 leaves extract's temporary output behind (nothing can remove it then); a later run
    to the same output removes it once it is stale (writer gone, untouched for a minute), but
    never one whose writer is alive."""
    from pydesync.fsutil import STALE_AFTER

    assert run_cli("make", "-s", data / "store", data / "a.caibx", data / "a").returncode == 0
    proc = pydesync("extract", "-n", "1", "-s", data / "store", data / "a.caibx", data / "out")
    deadline = time.monotonic() + 30
    while not list(data.glob(".out.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(data.glob(".out.*.tmp"))
    assert len(left) == 1 and not (data / "out").exists()
    live = data / f".out.{os.getpid()}-0123456789ab.tmp"  # this test's own pid: a live writer
    live.write_bytes(b"in progress")
    for path in (left[0], live):
        os.utime(path, (time.time() - STALE_AFTER - 5,) * 2)
    r = run_cli("extract", "-s", data / "store", data / "a.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "a").read_bytes()
    assert sorted(data.glob(".out.*.tmp")) == [live]
