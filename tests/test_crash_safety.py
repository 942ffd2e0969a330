"""kill -9 at random moments: a store never holds a chunk whose content does not match its name, a
target is the old or the new file, and running the command again completes.

Each test kills a real process (SIGKILL, so no clean-up of ours runs) at a random time, many times
(PYDESYNC_CRASH_ROUNDS, default 8; PYDESYNC_CRASH_SEED varies the moments),
then checks the invariants with pydesync's own verify and by comparing files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli
from faultserver import Gate
from procutil import HANG_GUARD, start_server, stop, wait_until_written

from pydesync.codec import decompress
from pydesync.index import read_index

# The suite's rounds; a long campaign: PYDESYNC_CRASH_ROUNDS=200 PYDESYNC_CRASH_SEED=7 pytest this file.
ROUNDS = int(os.environ.get("PYDESYNC_CRASH_ROUNDS", "8"))
SEED = int(os.environ.get("PYDESYNC_CRASH_SEED", "0"))


def pydesync(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pydesync", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Aim:
    """Where in a run to kill it: a random moment within `span` seconds of its start. A run that
    ends before its kill must have succeeded; the round is then tried again from its starting
    state, aiming earlier. However fast or slow the machine, every round ends with a kill that
    landed mid-run (at worst during start-up, which no run can skip)."""

    def __init__(self, rng: random.Random, span: float):
        self.rng = rng
        self.span = span

    def moment(self) -> float:
        return self.rng.uniform(0.05, 1.0) * self.span

    def missed(self, proc: subprocess.Popen) -> None:
        """`proc` ended before its kill: it must have succeeded; aim earlier next time."""
        assert proc.wait() == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
        self.span /= 2


def kill_mid_run(argv: list[object], aim: Aim, reset: Callable[[], None]) -> None:
    """Run `pydesync ARGV` and SIGKILL it at a random moment of its run; returns once a kill has
    landed. A run that finished first is followed by `reset()` (back to the starting state) and
    another try."""
    while True:
        proc = pydesync(*argv)
        time.sleep(aim.moment())
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        aim.missed(proc)
        reset()


def duration(argv: list[object]) -> float:
    """How long one uninterrupted run takes here and now (it must succeed)."""
    started = time.monotonic()
    r = run_cli(*argv)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - started


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
    make = ["make", "-s", data / "store", data / "a.caibx", data / "a"]
    aim = Aim(random.Random(SEED + 1), duration(make))
    shutil.rmtree(data / "store")

    def start_over() -> None:
        shutil.rmtree(data / "store")
        (data / "a.caibx").unlink()

    for _ in range(ROUNDS):
        kill_mid_run(make, aim, start_over)
        if (data / "store").exists():
            store_is_sound(data / "store")
    r = run_cli(*make)
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", "-s", data / "store").returncode == 0
    r = run_cli("extract", "-s", data / "store", data / "a.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "a").read_bytes()


def test_extract_killed_leaves_old_or_new_and_completes(data: Path):
    for name in ("a", "b"):
        assert run_cli("make", "-s", data / "store", data / f"{name}.caibx", data / name).returncode == 0
    old, new = (data / "a").read_bytes(), (data / "b").read_bytes()
    extract = ["extract", "-s", data / "store", data / "b.caibx", data / "target"]
    aim = Aim(random.Random(SEED + 2), duration(extract))

    def start_over() -> None:
        shutil.copy(data / "a", data / "target")

    start_over()
    for _ in range(ROUNDS):
        kill_mid_run(extract, aim, start_over)
        assert (data / "target").read_bytes() in (old, new)
        start_over()
    r = run_cli(*extract)
    assert r.returncode == 0 and (data / "target").read_bytes() == new


def test_prune_killed_keeps_what_is_referenced(data: Path):
    def make_both() -> None:
        for name in ("a", "b"):
            assert run_cli("make", "-s", data / "store", data / f"{name}.caibx", data / name).returncode == 0

    make_both()
    keep = {c.id.hex() for c in read_index(str(data / "b.caibx"))}
    prune = ["prune", "-y", "-s", data / "store", data / "b.caibx"]
    aim = Aim(random.Random(SEED + 4), duration(prune))
    make_both()
    for _ in range(ROUNDS // 2):
        kill_mid_run(prune, aim, make_both)
        names = {p.name.split(".")[0] for p in (data / "store").glob("*/*.cacnk")}
        assert keep <= names
        store_is_sound(data / "store")
    assert run_cli(*prune).returncode == 0
    assert {p.name.split(".")[0] for p in (data / "store").glob("*/*.cacnk")} == keep
    r = run_cli("extract", "-s", data / "store", data / "b.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "b").read_bytes()


def test_chunk_server_killed_during_uploads(data: Path):
    """make through a writable chunk-server that is killed (while the upload runs) and restarted:
    its store stays sound and the upload completes on the last run."""
    store = data / "served"
    store.mkdir()
    aim = Aim(random.Random(SEED + 5), 1.0)
    rounds = 0
    while rounds <= ROUNDS // 2:
        server, port = start_server("chunk-server", "-w", "-s", store, stderr=data / "server.log")
        client = pydesync("make", "-s", f"http://127.0.0.1:{port}/", data / "a.caibx", data / "a")
        if rounds == ROUNDS // 2:  # the last run is left alone
            assert client.wait(HANG_GUARD) == 0, client.stderr.read().decode()  # type: ignore[union-attr]
            stop(server)
            rounds += 1
        else:
            time.sleep(aim.moment())
            finished = client.poll() is not None
            server.send_signal(signal.SIGKILL)
            server.wait()
            client.wait(HANG_GUARD)
            if finished:  # the upload was over before the kill: start again from an empty store
                aim.missed(client)
                shutil.rmtree(store)
                store.mkdir()
            else:
                rounds += 1
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
    tar = ["tar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", tree]

    def start_over() -> None:
        shutil.rmtree(tmp_path / "store")
        (tmp_path / "t.caidx").unlink()

    aim = Aim(rng, duration(tar))
    start_over()
    for _ in range(ROUNDS):
        kill_mid_run(tar, aim, start_over)
        if (tmp_path / "store").exists():
            store_is_sound(tmp_path / "store")
        assert not (tmp_path / "t.caidx").exists() or read_index(str(tmp_path / "t.caidx"))
    r = run_cli(*tar)
    assert r.returncode == 0, r.stderr
    r = run_cli("untar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for d in range(6):
        for f in range(6):
            name = Path(f"d{d}") / f"f{f}"
            assert (tmp_path / "out" / name).read_bytes() == (tree / name).read_bytes()


def test_what_killed_runs_leave_is_taken_up_or_removed_by_the_next(data: Path, fault):
    """kill -9 leaves extract's partial output and its index behind (nothing can remove them then):
    the next run to the same output takes them up and removes them. Temporary files of other
    writers (one that found the partial held) are removed once stale (writer gone, untouched for a
    minute), never one whose writer is alive. The kill lands while the store holds the requests."""
    from pydesync.fsutil import STALE_AFTER

    assert run_cli("make", "-s", data / "store", data / "a.caibx", data / "a").returncode == 0
    gate = Gate(allow=3)
    server = fault(data / "store", gate)
    proc = pydesync("extract", "-n", "1", "-s", server.url, data / "a.caibx", data / "out")
    gate.wait_for_waiting(1)
    wait_until_written(data / ".out.partial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in data.glob(".out*")) == [".out.partial", ".out.partial.caibx"]
    assert not (data / "out").exists()
    dead = data / ".out.4194305-0123456789ab.tmp"  # a pid above Linux's largest: a writer long gone
    live = data / f".out.{os.getpid()}-0123456789ab.tmp"  # this test's own pid: a live writer
    for path in (dead, live):
        path.write_bytes(b"in progress")
        os.utime(path, (time.time() - STALE_AFTER - 5,) * 2)
    r = run_cli("extract", "--print-stats", "-s", data / "store", data / "a.caibx", data / "out")
    assert r.returncode == 0 and (data / "out").read_bytes() == (data / "a").read_bytes()
    assert json.loads(r.stdout)["chunks-from-partial"] >= 1
    assert sorted(data.glob(".out*")) == [live]
