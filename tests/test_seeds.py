"""extract with seeds, in place, with reflinks; stats; interruption.

desync's own seed cases run against its test data (read in place from ../shared; the
files its MANIFEST calls symlinks are stored there as small files naming their target,
so a temporary folder of real symlinks stands in for the folder).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_error, loop_device, need, no_stray_files, run_cli
from faultserver import Gate
from procutil import HANG_GUARD, default_signals, free_port, stop, wait_listening

from pydesync.index import read_index

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def testdata(desync_cmd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder `testdata` of symlinks to desync's cmd/desync/testdata, with its stored
    'symlink' files (a few bytes naming a sibling) made real symlinks."""
    root = tmp_path_factory.mktemp("desync-seeds")
    folder = root / "testdata"
    folder.mkdir()
    for entry in desync_cmd.iterdir():
        target = entry
        if entry.is_file() and entry.stat().st_size < 64:
            named = entry.read_bytes().strip().decode(errors="replace")
            if named and (desync_cmd / named).exists():
                target = desync_cmd / named
        (folder / entry.name).symlink_to(target)
    return root


def cli_in(cwd: Path, *args: object, **kw):
    return run_cli(*map(str, args), cwd=cwd, **kw)


DESYNC_SUCCEEDS = [
    ["--store", "testdata/blob1.store", "--seed", "testdata/blob2.caibx"],
    ["-s", "testdata/blob1.store", "--seed", "testdata/blob2.caibx", "--seed", "testdata/blob1.caibx"],
    ["-s", "testdata/blob1.store", "--seed-dir", "testdata", "--skip-invalid-seeds"],
    ["--store", "testdata/blob1.store", "--seed", "testdata/blob2_without_data.caibx:testdata/blob2"],
    ["--store", "testdata/blob1.store", "--seed",
     "testdata/blob2_without_data.caibx:testdata/blob2:reserved"],
    ["-s", "testdata/blob1.store", "--seed", "testdata/blob2_without_data.caibx:testdata/blob2",
     "--seed", "testdata/blob1_without_data.caibx:testdata/blob1"],
    ["--store", "testdata/blob1.store", "--seed", "testdata/blob2_corrupted.caibx", "--skip-invalid-seeds"],
    ["--store", "testdata/empty.store", "--seed", "testdata/blob2_corrupted.caibx", "--seed",
     "testdata/blob1.caibx", "--skip-invalid-seeds"],
    ["-s", "testdata/blob1.store", "--seed-dir", "testdata", "--seed", "testdata/blob1.caibx"],
    ["--store", "testdata/empty.store", "--seed", "testdata/blob2_corrupted.caibx", "--seed",
     "testdata/blob1.caibx"],
    ["--store", "testdata/empty.store", "--seed", "testdata/blob1.caibx"],
    ["--store", "testdata/blob1.store", "--seed", "testdata/blob2_corrupted.caibx",
     "--regenerate-invalid-seeds"],
    ["--store", "testdata/empty.store", "--seed", "testdata/blob1_corrupted_index.caibx",
     "--regenerate-invalid-seeds"],
]


@pytest.mark.parametrize("args", DESYNC_SUCCEEDS, ids=lambda a: " ".join(a[2:]))
def test_desync_seed_cases_that_succeed(testdata: Path, tmp_path: Path, args: list[str]):
    r = cli_in(testdata, "extract", *args, "--print-stats", "testdata/blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == (testdata / "testdata" / "blob1").read_bytes()
    stats = json.loads(r.stdout)
    assert stats["chunks-total"] == 161 and stats["bytes-total"] == 2097152
    if "empty.store" in args:
        assert stats["chunks-from-store"] == 0


DESYNC_FAILS = [
    (["--store", "testdata/blob1.store", "--seed", "testdata/blob2_corrupted.caibx"], "blob1.caibx",
     "doesn't match its data"),
    (["--store", "testdata/blob1.store", "--seed", "testdata/blob_missing"], "blob1.caibx", "invalid seed"),
    (["--store", "testdata/blob1.store", "--seed", "testdata/blob2_without_data.caibx"], "blob1.caibx",
     "does not exist"),
    (["--store", "testdata/empty.store", "--seed", "testdata/blob2_corrupted.caibx", "--seed",
      "testdata/blob1.caibx"], "blob2.caibx", "doesn't match its data"),
    (["--store", "testdata/blob2.store", "--seed", "testdata/blob1_corrupted_index.caibx", "--seed",
      "testdata/blob1.caibx"], "blob2.caibx", "doesn't match its data"),
    (["--store", "testdata/blob2.store", "--seed", "testdata/blob1_corrupted_index.caibx"], "blob2.caibx",
     "doesn't match its data"),
    (["--store", "testdata/blob1.store", "--seed", "testdata/blob1_corrupted_index.caibx",
      "--regenerate-invalid-seeds", "--skip-invalid-seeds"], "blob1.caibx", "mutually exclusive"),
]


@pytest.mark.parametrize(("args", "target", "words"), DESYNC_FAILS, ids=lambda a: str(a)[:60])
def test_desync_seed_cases_that_fail(testdata: Path, tmp_path: Path, args: list[str], target: str,
                                     words: str):
    r = cli_in(testdata, "extract", *args, f"testdata/{target}", tmp_path / "out")
    assert_clean_error(r, words)
    assert not (tmp_path / "out").exists()
    assert no_stray_files(tmp_path, set()) == []  # no temporary file left behind (a partial may be)


# ---- an A/B image pair -------------------------------------------------------------------------
def image_pair(folder: Path, size: int = 8 << 20, change: float = 0.05, seed: int = 1) -> None:
    """v1 of random data with zero runs; v2 = v1 with ~`change` of it rewritten in a few places."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[size // 3: size // 3 + (1 << 20)] = bytes(1 << 20)  # a zero run (null chunks)
    (folder / "v1").write_bytes(data)
    budget = int(size * change)
    while budget > 0:
        n = min(budget, rng.randrange(4096, 64 * 1024))
        at = rng.randrange(0, size - n)
        data[at:at + n] = rng.randbytes(n)
        budget -= n
    (folder / "v2").write_bytes(data)


@pytest.fixture
def ab(tmp_path: Path) -> Path:
    image_pair(tmp_path)
    for name in ("v1", "v2"):
        r = run_cli("make", "-s", tmp_path / "store", tmp_path / f"{name}.caibx", tmp_path / name)
        assert r.returncode == 0, r.stderr
    return tmp_path


def chunk_server(store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "chunk-server", "-s", str(store), "-l",
                             f"127.0.0.1:{port}", "--log", str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_listening(proc, port)
    return proc, f"http://127.0.0.1:{port}/"


def test_seed_fetches_only_changed_chunks_over_http(ab: Path):
    """v2 with v1 as seed, through a real chunk-server: only chunks v1 lacks are requested, and
    the output is v2 exactly."""
    proc, url = chunk_server(ab / "store", ab / "access.log")
    try:
        r = run_cli("extract", "-s", url, "--seed", ab / "v1.caibx", "--print-stats", ab / "v2.caibx",
                    ab / "out")
    finally:
        stop(proc)
    assert r.returncode == 0, r.stderr
    assert (ab / "out").read_bytes() == (ab / "v2").read_bytes()
    v1 = {c.id for c in read_index(str(ab / "v1.caibx"))}
    v2 = read_index(str(ab / "v2.caibx"))
    new = {c.id for c in v2 if c.id not in v1}
    log = (ab / "access.log").read_text().splitlines()
    requested = {line.split("/")[-1].split(".")[0] for line in log if "GET" in line}
    assert requested == {i.hex() for i in new}
    stats = json.loads(r.stdout)
    assert stats["chunks-from-store"] == sum(1 for c in v2 if c.id in new)
    assert stats["chunks-from-seeds"] + stats["chunks-from-store"] + stats["chunks-in-place"] \
        <= stats["chunks-total"]  # the rest are null chunks, never fetched
    assert stats["bytes-copied-from-seeds"] > 0 and stats["seeds"] == 2


@pytest.mark.parametrize("mode", ["default", "skip", "regenerate"])
def test_seed_changed_after_indexing(ab: Path, mode: str):
    """v1 is modified after v1.caibx was made: an error naming the seed, or (skip) its chunks come
    from the store, or (regenerate) it is re-chunked and still used."""
    v2_ids = {c.id for c in read_index(str(ab / "v2.caibx"))}
    shared = [c for c in read_index(str(ab / "v1.caibx")) if c.id in v2_ids and c.size > 5000]
    with open(ab / "v1", "r+b") as f:  # a chunk v2 needs, changed in the seed
        f.seek(shared[len(shared) // 2].start + 100)
        f.write(b"\xff" * 5000)
    flags = {"default": [], "skip": ["--skip-invalid-seeds"],
             "regenerate": ["--regenerate-invalid-seeds"]}[mode]
    r = run_cli("extract", "-s", ab / "store", "--seed", ab / "v1.caibx", *flags, "--print-stats",
                ab / "v2.caibx", ab / "out")
    if mode == "default":
        assert_clean_error(r, "seed index for", "v1", "doesn't match its data")
        assert not (ab / "out").exists()
        return
    assert r.returncode == 0, r.stderr
    assert (ab / "out").read_bytes() == (ab / "v2").read_bytes()
    stats = json.loads(r.stdout)
    assert stats["chunks-from-seeds"] > 0


def test_in_place_update_of_a_file(ab: Path):
    """-k on v1 turns it into v2, keeping the chunks already at their place."""
    shutil.copy(ab / "v1", ab / "target")
    r = run_cli("extract", "-k", "-s", ab / "store", "--print-stats", ab / "v2.caibx", ab / "target")
    assert r.returncode == 0, r.stderr
    assert (ab / "target").read_bytes() == (ab / "v2").read_bytes()
    stats = json.loads(r.stdout)
    assert stats["chunks-in-place"] > 0 and stats["chunks-from-store"] < stats["chunks-total"] // 2


def test_in_place_on_a_block_device(ab: Path):
    """A loop device as the target: written in place, never truncated (the device is larger)."""
    size = (ab / "v2").stat().st_size
    image = ab / "disk.img"
    with open(image, "wb") as f:
        f.write((ab / "v1").read_bytes())
        f.write(b"\xaa" * (1 << 20))  # beyond the blob: must survive
    with loop_device(image) as device:
        r = run_cli("extract", "-s", ab / "store", "--seed", ab / "v1.caibx", ab / "v2.caibx", device)
        assert r.returncode == 0, r.stderr
        with open(device, "rb") as dev:
            assert dev.read(size) == (ab / "v2").read_bytes()
            assert dev.read(1 << 20) == b"\xaa" * (1 << 20)


def test_reflinks_on_btrfs(tmp_path: Path):
    """On a btrfs loop image, seed ranges are cloned (FICLONERANGE), not copied."""
    need(IS_ROOT and shutil.which("mkfs.btrfs") is not None, "needs root and btrfs-progs (mkfs.btrfs)")
    image = tmp_path / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    r = subprocess.run(["mkfs.btrfs", "-q", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mount = tmp_path / "mnt"
    mount.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    need(r.returncode == 0, f"cannot mount a btrfs loop image here: {r.stderr.strip()}")
    try:
        # 4 KiB-aligned changes (a filesystem image's blocks), so seed and target ranges align
        rng = random.Random(5)
        v1 = bytearray(rng.randbytes(16 << 20))
        v2 = bytearray(v1)
        for block in rng.sample(range(len(v2) // 4096), 64):
            v2[block * 4096:(block + 1) * 4096] = rng.randbytes(4096)
        (mount / "v1").write_bytes(v1)
        (mount / "v2").write_bytes(v2)
        for name in ("v1", "v2"):
            r = run_cli("make", "-s", mount / "store", mount / f"{name}.caibx", mount / name)
            assert r.returncode == 0, r.stderr
        r = run_cli("extract", "-s", mount / "store", "--seed", mount / "v1.caibx", "--print-stats",
                    mount / "v2.caibx", mount / "out")
        assert r.returncode == 0, r.stderr
        assert (mount / "out").read_bytes() == bytes(v2)
        stats = json.loads(r.stdout)
        assert stats["bytes-cloned-from-seeds"] > 8 << 20, stats
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_extract_leaves_the_old_target(ab: Path, sig: int, fault):
    """Stopped mid-transfer (the store holds its requests after a random number of chunks), extract
    leaves the old target as it was, and its partial with that partial's index (or nothing, when no
    chunk had been written) for the next run; left alone, it completes. (Each attempt starts afresh,
    --no-resume, so that it needs as many chunks as its gate lets through.)"""
    rng = random.Random(sig)
    needed = len({c.id for c in read_index(str(ab / "v2.caibx"))})
    for attempt in range(6):
        gate = Gate(allow=rng.randrange(0, needed))
        server = fault(ab / "store", gate)
        shutil.copy(ab / "v1", ab / "target")
        proc = subprocess.Popen([sys.executable, "-m", "pydesync", "extract", "-n", "2", "--no-resume",
                                 "-s", server.url, str(ab / "v2.caibx"), str(ab / "target")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=default_signals)
        gate.wait_for_waiting(1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_GUARD)
        gate.release()
        assert proc.returncode != 0
        assert (ab / "target").read_bytes() == (ab / "v1").read_bytes(), (attempt, err)
        assert b"Traceback" not in err and b"interrupted" in err, (proc.returncode, err)
        left = sorted(n for n in os.listdir(ab) if re.match(r"^\.target", n))
        assert left in ([], [".target.partial", ".target.partial.caibx"]), left
    r = run_cli("extract", "-n", "2", "-s", ab / "store", ab / "v2.caibx", ab / "target")
    assert r.returncode == 0 and (ab / "target").read_bytes() == (ab / "v2").read_bytes()
