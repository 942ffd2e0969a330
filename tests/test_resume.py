"""Interrupted extracts resume: what the first run wrote and verified is not fetched again.

The first run goes through a FaultServer whose gate holds every request after a chosen one, so the
extract is stalled at a known point when the test signals it (no bet on time). The rerun goes
through the real chunk-server, whose access log says which chunks were fetched.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Result, run_cli
from faultserver import FaultServer, Gate
from procutil import HANG_GUARD, free_port, stop, wait_listening, wait_until_written

from pydesync.index import Index, read_index

SIZES = "4:16:64"  # KiB: a few hundred chunks in a few MiB
CHUNK_ID = re.compile(r"[0-9a-f]{64}")


def make_blob(tmp_path: Path, name: str, data: bytes) -> Index:
    (tmp_path / name).write_bytes(data)
    r = run_cli("make", "-m", SIZES, "-s", tmp_path / "store", tmp_path / f"{name}.caibx", tmp_path / name)
    assert r.returncode == 0, r.stderr
    return read_index(str(tmp_path / f"{name}.caibx"))


def interrupted_extract(tmp_path: Path, name: str, allow: int, sig: signal.Signals) -> None:
    """extract NAME to `out` through a server that answers `allow` requests and holds the rest;
    once it is held there, `sig` stops it."""
    gate = Gate(allow)
    server = FaultServer(tmp_path / "store", gate)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pydesync", "extract", "-n", "2", "-s", server.url,
                                 str(tmp_path / f"{name}.caibx"), str(tmp_path / "out")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        gate.wait_for_waiting(1)
        wait_until_written(tmp_path / ".out.partial")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode != 0, err
    finally:
        gate.release(drop=True)
        server.stop()
    assert not (tmp_path / "out").exists()


def verified_in_partial(tmp_path: Path, index: Index) -> set[bytes]:
    """The chunks the partial holds, checked against their ids (what a rerun must not fetch)."""
    data = (tmp_path / ".out.partial").read_bytes()
    return {bytes(c.id) for c in index if hashlib.new("sha512_256", data[c.start:c.end]).digest() == c.id}


def served(tmp_path: Path, *args: object) -> tuple[set[bytes], Result]:
    """Run the command `args` (`URL` standing for the server's) against the real chunk-server on
    tmp_path/store: the ids of the chunks it served, and the command's result."""
    log = tmp_path / "access.log"
    log.unlink(missing_ok=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "chunk-server", "-s", str(tmp_path / "store"),
                             "-l", f"127.0.0.1:{port}", "--log", str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_listening(proc, port)
        r = run_cli(*(f"http://127.0.0.1:{port}/" if a == "URL" else a for a in args))
    finally:
        stop(proc)
    assert r.returncode == 0, r.stderr
    return {bytes.fromhex(h) for h in CHUNK_ID.findall(log.read_text())}, r


def counted_extract(tmp_path: Path, name: str, *flags: str) -> tuple[set[bytes], dict[str, int]]:
    """extract NAME to `out` from the real chunk-server: the chunk ids it was asked for, and the
    --print-stats figures."""
    fetched, r = served(tmp_path, "extract", "--print-stats", *flags, "-s", "URL", tmp_path / f"{name}.caibx",
                        tmp_path / "out")
    return fetched, json.loads(r.stdout)


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_an_interrupted_extract_fetches_only_what_it_lacked(tmp_path: Path, sig: signal.Signals):
    data = random.Random(sig.value).randbytes(6 << 20)
    index = make_blob(tmp_path, "blob", data)
    allow = random.Random(sig.value + 100).randrange(20, len(index) - 20)  # a point of the run's
    interrupted_extract(tmp_path, "blob", allow, sig)
    assert leftovers(tmp_path) == [".out.partial", ".out.partial.caibx"]  # one partial, with its index
    held = verified_in_partial(tmp_path, index)
    assert held  # (what was answered and written before the signal)
    fetched, stats = counted_extract(tmp_path, "blob")
    assert (tmp_path / "out").read_bytes() == data
    assert fetched.isdisjoint(held)
    assert fetched | held == {bytes(c.id) for c in index}
    assert stats["chunks-from-partial"] == sum(1 for c in index if bytes(c.id) in held)
    assert leftovers(tmp_path) == []
    print(f"{sig.name}: {len(held)} of {len(index)} chunks held by the partial, {len(fetched)} fetched "
          f"({sum(c.size for c in index if bytes(c.id) in fetched)} bytes, the partial lacked "
          f"{sum(c.size for c in index if bytes(c.id) not in held)})")


def test_a_corrupted_partial_is_repaired_not_trusted(tmp_path: Path):
    data = random.Random(5).randbytes(4 << 20)
    index = make_blob(tmp_path, "blob", data)
    interrupted_extract(tmp_path, "blob", len(index) // 2, signal.SIGKILL)
    held = verified_in_partial(tmp_path, index)
    victim = next(c for c in index if bytes(c.id) in held)
    with open(tmp_path / ".out.partial", "r+b") as f:  # what a crash can leave: a torn write
        f.seek(victim.start + victim.size // 2)
        f.write(b"\xff" * 100)
    fetched, _ = counted_extract(tmp_path, "blob")
    assert (tmp_path / "out").read_bytes() == data
    assert bytes(victim.id) in fetched
    assert fetched.isdisjoint(held - {bytes(victim.id)})


def test_a_partial_of_v1_speeds_up_v2(tmp_path: Path):
    """The image changed between the runs: the partial of v1 is a seed for v2 (each chunk checked),
    and goes once v2 is in place."""
    rng = random.Random(6)
    v1 = bytearray(rng.randbytes(5 << 20))
    v1_index = make_blob(tmp_path, "v1", bytes(v1))
    v2 = bytearray(v1)
    for _ in range(8):  # a few changed places
        at = rng.randrange(0, len(v2) - 4096)
        v2[at:at + 4096] = rng.randbytes(4096)
    v2_index = make_blob(tmp_path, "v2", bytes(v2))
    interrupted_extract(tmp_path, "v1", len(v1_index) * 2 // 3, signal.SIGTERM)
    held = verified_in_partial(tmp_path, v1_index)
    fetched, stats = counted_extract(tmp_path, "v2")
    assert (tmp_path / "out").read_bytes() == bytes(v2)
    v2_ids = {bytes(c.id) for c in v2_index}
    assert fetched == v2_ids - held
    assert stats["chunks-from-seeds"] >= len(v2_ids & held)
    assert leftovers(tmp_path) == []


def test_no_resume_discards_the_partial(tmp_path: Path):
    data = random.Random(7).randbytes(3 << 20)
    index = make_blob(tmp_path, "blob", data)
    interrupted_extract(tmp_path, "blob", len(index) // 2, signal.SIGINT)
    fetched, stats = counted_extract(tmp_path, "blob", "--no-resume")
    assert fetched == {bytes(c.id) for c in index}
    assert "chunks-from-partial" not in stats
    assert (tmp_path / "out").read_bytes() == data
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_an_interrupted_tree_extract_keeps_its_chunks(tmp_path: Path, sig: signal.Signals):
    """untar -i from a network store, stopped half way while the store holds a request (SIGTERM
    ends it there too, not once the store lets go): the chunks it had fetched stay beside the
    target (`.out.partial-chunks`), and the rerun fetches none of them; the cache goes once the tree
    is complete."""
    from pydesync.store import LocalStore, StoreOptions

    rng = random.Random(8)
    tree = tmp_path / "tree"
    for n in range(6):
        (tree / f"d{n % 2}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{n % 2}" / f"f{n}").write_bytes(rng.randbytes(600_000))
    r = run_cli("tar", "-i", "-m", SIZES, "-s", tmp_path / "store", tmp_path / "t.caidx", tree)
    assert r.returncode == 0, r.stderr
    index = read_index(str(tmp_path / "t.caidx"))
    gate = Gate(len(index) // 2)
    server = FaultServer(tmp_path / "store", gate)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pydesync", "untar", "-i", "-n", "2", "-s", server.url,
                                 str(tmp_path / "t.caidx"), str(tmp_path / "out")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        gate.wait_for_waiting(1)
        cache = tmp_path / ".out.partial-chunks"
        deadline = time.monotonic() + HANG_GUARD
        while not (cache.is_dir() and any(cache.glob("*/*"))):  # a fetched chunk is kept
            assert time.monotonic() < deadline, "no chunk was kept"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode != 0 and b"Traceback" not in err, err
    finally:
        gate.release(drop=True)
        server.stop()
    kept = {bytes(i) for i in LocalStore(cache, StoreOptions(uncompressed=True)).ids()}
    assert kept
    fetched, _ = served(tmp_path, "untar", "-i", "-s", "URL", tmp_path / "t.caidx", tmp_path / "out")
    assert fetched.isdisjoint(kept)
    assert fetched | kept == {bytes(c.id) for c in index}
    for n in range(6):
        name = Path(f"d{n % 2}") / f"f{n}"
        assert (tmp_path / "out" / name).read_bytes() == (tree / name).read_bytes()
    assert not cache.exists()  # (the killed run's half-built tree beside `out` is issue 19's to keep)
