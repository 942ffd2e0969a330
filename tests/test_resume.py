"""Interrupted extracts resume: what the first run wrote and verified is not fetched again.

The first run goes through a FaultServer whose gate holds every request after a chosen one, so the
extract is stalled at a known point when the test signals it (no bet on time). The rerun goes
through the real chunk-server, whose access log says which chunks were fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Result, Sshd, assert_clean_error, loop_device, run_cli
from faultserver import FaultServer, Gate
from procutil import HANG_GUARD, free_port, processes, stop, wait_listening
from sshd_util import REMOTE_PYDESYNC

from pydesync.index import Index, read_index

SIZES = "4:16:64"  # KiB: a few hundred chunks in a few MiB
CHUNK_ID = re.compile(r"[0-9a-f]{64}")


def make_blob(tmp_path: Path, name: str, data: bytes) -> Index:
    (tmp_path / name).write_bytes(data)
    r = run_cli("make", "-m", SIZES, "-s", tmp_path / "store", tmp_path / f"{name}.caibx", tmp_path / name)
    assert r.returncode == 0, r.stderr
    return read_index(str(tmp_path / f"{name}.caibx"))


def interrupted(tmp_path: Path, allow: int, sig: signal.Signals, *args: str,
                written: Callable[[], bool]) -> None:
    """Run `pydesync ARGS` (`URL` standing for the server's) through a server that answers `allow`
    requests and holds the rest; once it is held there and `written()` says a chunk is in
    place, `sig` stops it, and it must fail cleanly."""
    gate = Gate(allow)
    server = FaultServer(tmp_path / "store", gate)
    try:
        argv = [sys.executable, "-m", "pydesync", *(server.url if a == "URL" else a for a in args)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        gate.wait_for_waiting(1)
        stop_when(proc, sig, written)
    finally:
        gate.release(drop=True)
        server.stop()


def stop_when(proc: subprocess.Popen, sig: signal.Signals, ready: Callable[[], bool]) -> None:
    """Once ready() (the run is held with a chunk written), stop it with `sig`: it must fail
    cleanly. (HANG_GUARD only ends a wait that would never end; nothing here is timed.)"""
    deadline = time.monotonic() + HANG_GUARD
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never got there"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode != 0 and b"Traceback" not in err, err


def interrupted_extract(tmp_path: Path, name: str, allow: int, sig: signal.Signals, *flags: str,
                        output: Path | None = None) -> None:
    """extract NAME to `output` (tmp_path/out), stopped by `sig` once held after `allow` requests."""
    output = output or tmp_path / "out"
    in_place = "-k" in flags or output.is_block_device()
    written = output if in_place else tmp_path / f".{output.name}.partial"
    index = read_index(str(tmp_path / f"{name}.caibx"))
    interrupted(tmp_path, allow, sig, "extract", "-n", "2", *flags, "-s", "URL",
                str(tmp_path / f"{name}.caibx"), str(output),
                written=lambda: written.exists() and bool(held_in(written, index)))
    assert output.exists() == in_place


def held_in(path: Path, index: Index) -> set[bytes]:
    """The chunks of `index` that the file holds at their places, checked against their ids."""
    with open(path, "rb") as f:
        data = f.read(index.length)
    return {bytes(c.id) for c in index if hashlib.new("sha512_256", data[c.start:c.end]).digest() == c.id}


def verified_in_partial(tmp_path: Path, index: Index, name: str = ".out.partial") -> set[bytes]:
    """The chunks the partial holds, checked against their ids (what a rerun must not fetch)."""
    return held_in(tmp_path / name, index)


def served(tmp_path: Path, *args: object) -> tuple[set[bytes], Result]:
    """Run the command `args` (`URL/` standing for the server's address) against the real
    chunk-server on tmp_path/store (its /sync/ serving the indexes in tmp_path): the ids of the
    chunks it served one by one, and the command's result."""
    log = tmp_path / "access.log"
    log.unlink(missing_ok=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "chunk-server", "-s", str(tmp_path / "store"),
                             "-l", f"127.0.0.1:{port}", "--sync-index-store", str(tmp_path),
                             "--log", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_listening(proc, port)
        base = f"http://127.0.0.1:{port}/"
        r = run_cli(*(a.replace("URL/", base) if isinstance(a, str) else a for a in args))
    finally:
        stop(proc)
    assert r.returncode == 0, r.stderr
    return {bytes.fromhex(h) for h in CHUNK_ID.findall(log.read_text())}, r


def counted_extract(tmp_path: Path, name: str, *flags: str,
                    output: Path | None = None) -> tuple[set[bytes], dict[str, int]]:
    """extract NAME to `output` (tmp_path/out) from the real chunk-server: the chunk ids it was
    asked for, and the --print-stats figures."""
    fetched, r = served(tmp_path, "extract", "--print-stats", *flags, "-s", "URL/",
                        tmp_path / f"{name}.caibx", output or tmp_path / "out")
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
    cache = tmp_path / ".out.partial-chunks"
    interrupted(tmp_path, len(index) // 2, sig, "untar", "-i", "-n", "2", "-s", "URL",
                str(tmp_path / "t.caidx"), str(tmp_path / "out"),
                written=lambda: cache.is_dir() and any(cache.glob("*/*")))
    kept = {bytes(i) for i in LocalStore(cache, StoreOptions(uncompressed=True)).ids()}
    assert kept
    fetched, _ = served(tmp_path, "untar", "-i", "-s", "URL/", tmp_path / "t.caidx", tmp_path / "out")
    assert fetched.isdisjoint(kept)
    assert fetched | kept == {bytes(c.id) for c in index}
    for n in range(6):
        name = Path(f"d{n % 2}") / f"f{n}"
        assert (tmp_path / "out" / name).read_bytes() == (tree / name).read_bytes()
    assert not cache.exists()  # (the killed run's half-built tree beside `out` is issue 19's to keep)


def test_an_interrupted_in_place_extract_keeps_what_it_wrote(tmp_path: Path):
    """-k writes into the target itself: a rerun keeps every chunk already right there (each
    hashed) and fetches the rest; a chunk torn by the interruption is fetched again."""
    data = random.Random(9).randbytes(4 << 20)
    index = make_blob(tmp_path, "blob", data)
    interrupted_extract(tmp_path, "blob", len(index) // 2, signal.SIGKILL, "-k")
    held = verified_in_partial(tmp_path, index, "out")
    assert held
    victim = next(c for c in index if bytes(c.id) in held)
    with open(tmp_path / "out", "r+b") as f:
        f.seek(victim.start)
        f.write(b"\x00" * 10)
    fetched, stats = counted_extract(tmp_path, "blob", "-k")
    assert (tmp_path / "out").read_bytes() == data
    assert fetched == {bytes(c.id) for c in index} - held | {bytes(victim.id)}
    assert stats["chunks-in-place"] == sum(1 for c in index if bytes(c.id) in held - {bytes(victim.id)})


def test_an_interrupted_extract_to_a_block_device_keeps_what_it_wrote(tmp_path: Path):
    """A loop device as the target (always written in place): the rerun keeps what is right on
    the device and fetches the rest; what lies beyond the blob is never touched."""
    data = random.Random(13).randbytes(3 << 20)
    index = make_blob(tmp_path, "blob", data)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(len(data)) + b"\xaa" * (1 << 20))
    with loop_device(image) as device:
        interrupted_extract(tmp_path, "blob", len(index) // 2, signal.SIGKILL, output=Path(device))
        held = held_in(Path(device), index)
        fetched, stats = counted_extract(tmp_path, "blob", output=Path(device))
        with open(device, "rb") as dev:
            assert dev.read(len(data)) == data
            assert dev.read(1 << 20) == b"\xaa" * (1 << 20)
    assert fetched == {bytes(c.id) for c in index} - held
    assert stats["chunks-in-place"] == len(held)


def test_sync_asks_only_for_what_the_partial_lacks(tmp_path: Path):
    """extract --sync after an interruption: the wishlist leaves out what the partial holds (the
    -c cache receives exactly the rest), and no chunk is fetched one by one."""
    from pydesync.store import LocalStore

    data = random.Random(10).randbytes(4 << 20)
    index = make_blob(tmp_path, "blob", data)
    interrupted_extract(tmp_path, "blob", len(index) // 3, signal.SIGTERM)
    held = verified_in_partial(tmp_path, index)
    fetched, r = served(tmp_path, "extract", "--print-stats", "--sync", "URL/sync/blob.caibx", "-s", "URL/",
                        "-c", tmp_path / "cache", tmp_path / "blob.caibx", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert fetched == set()
    synced = {bytes(i) for i in LocalStore(tmp_path / "cache").ids()}
    assert synced == {bytes(c.id) for c in index} - held
    assert json.loads(r.stdout)["chunks-from-partial"] == sum(1 for c in index if bytes(c.id) in held)


def test_info_counts_what_the_partial_holds(tmp_path: Path):
    data = random.Random(11).randbytes(3 << 20)
    index = make_blob(tmp_path, "blob", data)
    interrupted_extract(tmp_path, "blob", len(index) // 2, signal.SIGINT)
    held = verified_in_partial(tmp_path, index)
    with open(tmp_path / ".out.partial", "r+b") as f:  # a torn chunk is not counted
        victim = next(c for c in index if bytes(c.id) in held)
        f.seek(victim.start)
        f.write(b"\x01")
    held.discard(bytes(victim.id))
    r = run_cli("info", "--output", tmp_path / "out", tmp_path / "blob.caibx")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["in-partial"] == len(held)
    assert info["not-in-seed-nor-cache"] == info["unique"] - len(held)
    assert info["dedup-size-not-in-seed"] == sum(c.size for c in index if bytes(c.id) not in held)
    r = run_cli("info", "-f", "plain", "--output", tmp_path / "elsewhere", tmp_path / "blob.caibx")
    assert r.returncode == 0 and b"Chunks in partial output: 0" in r.stdout, r.stderr
    assert "in-partial" not in json.loads(run_cli("info", tmp_path / "blob.caibx").stdout)


def test_progress_starts_where_the_partial_leaves_off(tmp_path: Path):
    """The library's progress callback is first told of every chunk the partial holds, at once."""
    from pydesync import extract
    from pydesync.store import LocalStore

    data = random.Random(12).randbytes(3 << 20)
    index = make_blob(tmp_path, "blob", data)
    interrupted_extract(tmp_path, "blob", len(index) // 2, signal.SIGTERM)
    held = verified_in_partial(tmp_path, index)
    reports: list[int] = []
    stats = extract(index, str(tmp_path / "out"), LocalStore(tmp_path / "store"), progress=reports.append)
    assert reports[0] == stats.chunks_from_partial == sum(1 for c in index if bytes(c.id) in held)
    assert sum(reports) == len(index)
    assert (tmp_path / "out").read_bytes() == data


# ---- over ssh: casync's protocol through a real sshd -------------------------------------------------

PROTOGATE = Path(__file__).resolve().parent / "protogate.py"


def gated_remote(tmp_path: Path, remote: str, allow: int) -> dict[str, str]:
    """CASYNC_REMOTE_PATH running `remote` behind protogate.py: the chunks sent are logged to
    tmp_path/sent.log, and after `allow` of them the session is held until released."""
    gate = tmp_path / "gate"
    if not gate.exists():
        gate.mkdir()
        os.mkfifo(gate / "release")
    command = "casync" if remote == "casync" else REMOTE_PYDESYNC
    return {"CASYNC_REMOTE_PATH": f"{shlex.quote(sys.executable)} {shlex.quote(str(PROTOGATE))} "
                                  f"{tmp_path / 'sent.log'} {gate} {allow} {command}"}


def release_gate(tmp_path: Path) -> None:
    """Let a held protogate go on (nothing to do if none is held)."""
    try:
        fd = os.open(tmp_path / "gate" / "release", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # (ENXIO: nobody waits on it)
        return
    os.close(fd)


def gate_processes(tmp_path: Path) -> list[int]:
    marker = str(tmp_path / "gate").encode()
    return processes(lambda argv, _: any(marker in a for a in argv))


@pytest.mark.casync
@pytest.mark.parametrize("remote, sig", [("casync", signal.SIGKILL), ("casync", signal.SIGINT),
                                         ("pydesync", signal.SIGTERM)], ids=lambda x: getattr(x, "name", x))
def test_an_interrupted_ssh_extract_fetches_only_what_it_lacked(casync: str, sshd: Sshd, tmp_path: Path,
                                                                 remote: str, sig: signal.Signals):
    """The same over ssh, with casync's (or our) `pull` on the far side: the session is held after
    a chosen chunk while the client is stopped; the rerun's chunks are counted as the remote sends
    them."""
    data = random.Random(sig.value + 20).randbytes(5 << 20)
    index = make_blob(tmp_path, "blob", data)
    allow = random.Random(sig.value + 120).randrange(20, len(index) - 20)
    location = f"ssh://127.0.0.1{tmp_path / 'store'}"
    env = {**os.environ, **sshd.env, **gated_remote(tmp_path, remote, allow)}
    env.pop("PYDESYNC_REQUIRE_PEERS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "extract", "-n", "1", "-s", location,
                             str(tmp_path / "blob.caibx"), str(tmp_path / "out")], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        partial = tmp_path / ".out.partial"
        stop_when(proc, sig, lambda: (tmp_path / "gate" / "waiting").exists() and partial.exists()
                  and bool(held_in(partial, index)))
    finally:
        release_gate(tmp_path)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "out").exists()
    held = verified_in_partial(tmp_path, index)
    assert held
    (tmp_path / "sent.log").unlink()
    r = run_cli("extract", "--print-stats", "-s", location, tmp_path / "blob.caibx", tmp_path / "out",
                env={**sshd.env, **gated_remote(tmp_path, remote, -1)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data
    fetched = {bytes.fromhex(h) for h in (tmp_path / "sent.log").read_text().split()}
    assert fetched.isdisjoint(held)
    assert fetched | held == {bytes(c.id) for c in index}
    assert json.loads(r.stdout)["chunks-from-partial"] == sum(1 for c in index if bytes(c.id) in held)
    assert leftovers(tmp_path) == []
    deadline = time.monotonic() + HANG_GUARD
    while gate_processes(tmp_path):  # the held session's remote ends once released
        assert time.monotonic() < deadline, "a remote of the held session is still running"
        time.sleep(0.05)
    print(f"ssh {remote} {sig.name}: {len(held)} of {len(index)} chunks held by the partial, {len(fetched)} "
          f"fetched ({sum(c.size for c in index if bytes(c.id) in fetched)} bytes, the partial lacked "
          f"{sum(c.size for c in index if bytes(c.id) not in held)})")


# ---- what an interruption (or a hostile neighbour) can leave beside the target ----------------------

def plant(tmp_path: Path, name: str, data: bytes, kind: str = ".partial",
          sparse_from: int | None = None) -> None:
    """A partial of NAME's index beside `out`, as a run stopped after `sparse_from` bytes leaves it
    (the rest a hole), without running one."""
    with open(tmp_path / f".out{kind}", "wb") as f:
        f.write(data[:sparse_from] if sparse_from is not None else data)
        f.truncate(len(data))
    (tmp_path / f".out{kind}.caibx").write_bytes((tmp_path / f"{name}.caibx").read_bytes())


def local_extract(tmp_path: Path, name: str, *flags: object, output: object = None) -> Result:
    return run_cli("extract", "--print-stats", *flags, "-s", tmp_path / "store", tmp_path / f"{name}.caibx",
                   output if output is not None else tmp_path / "out")


def stats_of(r: Result) -> dict[str, int]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("planted", [".out.partial", ".out.partial.caibx", ".out.partial-old",
                                     ".out.partial-old.caibx"])
def test_a_fifo_where_a_partial_goes_is_not_waited_on(tmp_path: Path, planted: str):
    data = random.Random(14).randbytes(1 << 20)
    make_blob(tmp_path, "blob", data)
    if planted.endswith("-old"):
        (tmp_path / ".out.partial-old.caibx").write_bytes((tmp_path / "blob.caibx").read_bytes())
    elif planted == ".out.partial":
        (tmp_path / ".out.partial.caibx").write_bytes((tmp_path / "blob.caibx").read_bytes())
    os.mkfifo(tmp_path / planted)
    r = run_cli("info", "--output", tmp_path / "out", tmp_path / "blob.caibx")
    assert r.returncode == 0 and json.loads(r.stdout)["in-partial"] == 0, r.stderr
    r = local_extract(tmp_path, "blob")
    if planted == ".out.partial":  # (ours to use, but not a file: said, with what to do)
        assert_clean_error(r, "not a regular file")
        r = local_extract(tmp_path, "blob", "--no-resume")
    assert stats_of(r)["chunks-from-store"] > 0
    assert (tmp_path / "out").read_bytes() == data


def test_a_huge_partial_index_is_not_read(tmp_path: Path):
    """A partial index of gigabytes (damage, or planted) is not read into memory: the extract runs
    under an address-space limit far below its size."""
    import resource

    data = random.Random(15).randbytes(1 << 20)
    make_blob(tmp_path, "blob", data)
    (tmp_path / ".out.partial").write_bytes(data)
    with open(tmp_path / ".out.partial.caibx", "wb") as f:
        f.truncate(3 << 30)
    limit = 1 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "pydesync", "extract", "-s", str(tmp_path / "store"),
                           str(tmp_path / "blob.caibx"), str(tmp_path / "out")], preexec_fn=cap,
                          capture_output=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out").read_bytes() == data


def test_zero_chunks_in_a_hole_are_kept(tmp_path: Path):
    """A sparse target whose zero tail (a chunk shorter than the maximum) lies in a hole: nothing
    is fetched for it, in place or from a partial."""
    data = random.Random(16).randbytes(1 << 20) + bytes((12 << 20) + 50_000)
    make_blob(tmp_path, "blob", data)
    subprocess.run(["cp", "--sparse=always", str(tmp_path / "blob"), str(tmp_path / "out")], check=True)
    assert stats_of(local_extract(tmp_path, "blob", "-k"))["chunks-from-store"] == 0
    (tmp_path / "out").unlink()
    plant(tmp_path, "blob", data, sparse_from=1 << 20)
    assert stats_of(local_extract(tmp_path, "blob"))["chunks-from-store"] == 0
    assert (tmp_path / "out").read_bytes() == data


def test_a_torn_copy_of_a_repeated_chunk_is_copied_from_its_good_copy(tmp_path: Path):
    part = random.Random(17).randbytes(1 << 20)
    data = part + part
    index = make_blob(tmp_path, "blob", data)
    plant(tmp_path, "blob", data)
    second = next(c for c in index if c.start >= len(part) + 100_000)
    with open(tmp_path / ".out.partial", "r+b") as f:
        f.seek(second.start)
        f.write(b"\xee" * 10)
    r = run_cli("info", "--output", tmp_path / "out", tmp_path / "blob.caibx")
    assert json.loads(r.stdout)["not-in-seed-nor-cache"] == 0
    assert stats_of(local_extract(tmp_path, "blob"))["chunks-from-store"] == 0
    assert (tmp_path / "out").read_bytes() == data


def test_in_place_takes_a_partial_as_a_seed_and_removes_it(tmp_path: Path):
    data = random.Random(18).randbytes(2 << 20)
    index = make_blob(tmp_path, "blob", data)
    plant(tmp_path, "blob", data, sparse_from=1 << 20)
    (tmp_path / "out").write_bytes(b"old contents")
    stats = stats_of(local_extract(tmp_path, "blob", "-k"))
    assert stats["chunks-from-seeds"] == sum(1 for c in index if c.end <= 1 << 20)
    assert (tmp_path / "out").read_bytes() == data
    assert leftovers(tmp_path) == []
    plant(tmp_path, "blob", data)
    (tmp_path / "out").write_bytes(b"old contents")
    stats = stats_of(local_extract(tmp_path, "blob", "-k", "--no-resume"))
    assert stats["chunks-from-store"] == len(index) and leftovers(tmp_path) == []


def test_no_resume_leaves_a_partial_another_extract_holds(tmp_path: Path):
    from pydesync.partial import Target

    data = random.Random(19).randbytes(1 << 20)
    index = make_blob(tmp_path, "blob", data)
    holder = Target(str(tmp_path / "out"), index, in_place=False)
    try:
        holder.write(data, 0)
        r = local_extract(tmp_path, "blob", "--no-resume")
        assert stats_of(r)["chunks-from-store"] == len(index)
        assert (tmp_path / ".out.partial").read_bytes() == data  # (untouched: it is not ours)
        holder.commit()
    except BaseException:
        holder.abort()
        raise
    assert (tmp_path / "out").read_bytes() == data and leftovers(tmp_path) == []


def test_a_seed_dir_beside_the_target_skips_its_partials(tmp_path: Path):
    data = random.Random(20).randbytes(2 << 20)
    index = make_blob(tmp_path, "blob", data)
    plant(tmp_path, "blob", data, sparse_from=1 << 20)
    with open(tmp_path / ".out.partial", "r+b") as f:
        f.write(b"\x00" * 100)  # (torn: as a plain seed it would fail the whole extract)
    stats = stats_of(local_extract(tmp_path, "blob", "--seed-dir", tmp_path))
    assert stats["chunks-from-partial"] == sum(1 for c in index if c.end <= 1 << 20) - 1
    assert (tmp_path / "out").read_bytes() == data


def test_the_partial_an_other_index_displaced_is_taken_up_again(tmp_path: Path):
    """v1 interrupted, then v2 interrupted (v1's partial becomes -old), then v1 again: the v1
    partial is resumed, not overwritten."""
    v1 = random.Random(21).randbytes(2 << 20)
    v2 = random.Random(22).randbytes(2 << 20)
    i1 = make_blob(tmp_path, "v1", v1)
    make_blob(tmp_path, "v2", v2)
    plant(tmp_path, "v1", v1, sparse_from=1 << 20)
    plant(tmp_path, "v2", v2, kind=".partial-swapped", sparse_from=1 << 19)
    (tmp_path / ".out.partial").rename(tmp_path / ".out.partial-old")
    (tmp_path / ".out.partial.caibx").rename(tmp_path / ".out.partial-old.caibx")
    (tmp_path / ".out.partial-swapped").rename(tmp_path / ".out.partial")
    (tmp_path / ".out.partial-swapped.caibx").rename(tmp_path / ".out.partial.caibx")
    stats = stats_of(local_extract(tmp_path, "v1"))
    assert stats["chunks-from-partial"] == sum(1 for c in i1 if c.end <= 1 << 20)
    assert (tmp_path / "out").read_bytes() == v1
    assert leftovers(tmp_path) == []


def test_a_read_only_output_is_resumed_and_keeps_its_mode(tmp_path: Path):
    data = random.Random(23).randbytes(1 << 20)
    make_blob(tmp_path, "blob", data)
    (tmp_path / "out").write_bytes(b"old")
    (tmp_path / "out").chmod(0o444)
    chunk = next((tmp_path / "store").rglob("*.cacnk"))
    chunk.rename(tmp_path / "away")
    r = local_extract(tmp_path, "blob")
    assert r.returncode != 0
    assert (tmp_path / ".out.partial").stat().st_mode & 0o200  # (the owner can go on writing it)
    (tmp_path / "away").rename(chunk)
    stats_of(local_extract(tmp_path, "blob"))
    assert (tmp_path / "out").read_bytes() == data
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o444


@pytest.mark.parametrize("output", ["", "newdir/", "."])
def test_an_output_that_is_no_file_name_is_refused_before_any_work(tmp_path: Path, output: str):
    make_blob(tmp_path, "blob", b"x" * 100_000)
    r = run_cli("extract", "-s", tmp_path / "store", tmp_path / "blob.caibx", output, cwd=tmp_path)
    assert_clean_error(r, "not a file name" if output != "." else "directory")
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
