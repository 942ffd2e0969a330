#!/usr/bin/env python3
"""Time pydesync against the real casync on the same input, alternating, in one run.

Follows ../shared/spec/BENCHMARKS.md: inputs and stores on tmpfs (/dev/shm),
ratios rather than absolute times, median of --repeat runs.

    python3 bench/bench.py                 # real-1g (tar of /usr/share /usr/lib, 1 GiB)
    python3 bench/bench.py --size 256M     # quicker
    python3 bench/bench.py --input random  # incompressible input
    python3 bench/bench.py --input sparse --size 8G --repeat 1   # peak RSS on a huge input
    python3 bench/bench.py --tree /usr/lib  # tar/untar rows on another tree (--no-tree: skip them)
    python3 bench/bench.py --http           # + extract through our chunk-server on 127.0.0.1
    python3 bench/bench.py --ssh            # + extract over casync's protocol (stand-in ssh)
    python3 bench/bench.py --sshd           # + extract over a real sshd on 127.0.0.1
    python3 bench/bench.py --seed           # + A/B update: v2 over HTTP with v1 as seed
    python3 bench/bench.py --s3             # + a note: make/extract of 64 MiB on moto's S3 server, client CPU
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def make_input(kind: str, size: int, path: Path) -> None:
    """real: a tar of system files (compresses ~2.2x); random: deterministic AES-CTR bytes;
    sparse: a file that is one hole (all zeros, nothing on disk)."""
    if kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(size)
        return
    if kind == "real":
        cmd = f"tar -cf - --sort=name /usr/share /usr/lib 2>/dev/null | head -c {size}"
    else:
        cmd = (f"openssl enc -aes-256-ctr -pass pass:bench -nosalt -pbkdf2 < /dev/zero 2>/dev/null "
               f"| head -c {size}")
    with open(path, "wb") as f:
        subprocess.run(["bash", "-c", cmd], stdout=f, check=True)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command."""
    wall, rss, _cpu = timed_cpu(cmd, env)
    return wall, rss


def timed_cpu(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (KiB) and CPU seconds (user + system) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def floor_seconds(blob: Path) -> dict[str, float]:
    """The compute floor of each blob row: the one-core CPU time of the work no implementation can
    skip (casync's scan, SHA512/256 of every chunk, zstd level 3 of every chunk, zstd decompression),
    over the machine's cores. Reading, writing and the store's file operations are left out, so no
    tool reaches it."""
    import zstandard

    from pydesync.chunker import DEFAULT_SIZES, chunk_bytes, find_cuts
    from pydesync.digest import digest_of

    with open(blob, "rb") as f:
        data = f.read(1 << 30)  # at most 1 GiB in memory
    view = memoryview(data)

    def best(work: Callable[[], object]) -> float:
        times = []
        for _ in range(2):
            start = time.process_time()
            work()
            times.append(time.process_time() - start)
        return min(times)

    chunks = [view[a:b] for a, b in chunk_bytes(data, DEFAULT_SIZES)]
    level3 = zstandard.ZstdCompressor(level=3)
    packed = [level3.compress(c) for c in chunks]
    unpack = zstandard.ZstdDecompressor()
    scan = best(lambda: find_cuts(data, 0, len(data), DEFAULT_SIZES, True))
    hashing = best(lambda: [digest_of(c) for c in chunks])
    compress = best(lambda: [level3.compress(c) for c in chunks])
    decompress = best(lambda: [unpack.decompress(p) for p in packed])
    scale = os.path.getsize(blob) / len(data) / (os.cpu_count() or 1)
    return {"make, empty store": (scan + hashing + compress) * scale,
            "make, full store": (scan + hashing) * scale, "extract": (hashing + decompress) * scale}


def native_path() -> str:
    from pydesync import chunkio

    return "yes" if chunkio.native() else "NO (built without OpenSSL's or libzstd's headers)"


def scan_throughput(blob: Path) -> float:
    """MB/s of the C chunker scan alone on one core, the input already in memory."""
    from pydesync.chunker import DEFAULT_SIZES, find_cuts

    with open(blob, "rb") as f:
        data = f.read(1 << 30)  # at most 1 GiB in memory
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        find_cuts(data, 0, len(data), DEFAULT_SIZES, True)
        best = max(best, len(data) / (time.perf_counter() - start) / 1e6)
    return best


def run_case(name: str, repeat: int, prepare: Callable[[str], None],
             casync_cmd: list[str], ours_cmd: list[str]) -> dict[str, object]:
    """Median wall time and peak RSS of each tool; `prepare(tool)` runs before each of its runs."""
    results: dict[str, list[tuple[float, int]]] = {"casync": [], "pydesync": []}
    for _ in range(repeat):
        for tool, cmd in (("casync", casync_cmd), ("pydesync", ours_cmd)):
            prepare(tool)
            results[tool].append(timed(cmd))
    row: dict[str, object] = {"case": name}
    for tool, runs in results.items():
        row[tool] = statistics.median(w for w, _ in runs)
        row[f"{tool}_rss"] = max(r for _, r in runs) / 1024
    row["ratio"] = float(row["casync"]) / float(row["pydesync"])  # type: ignore[arg-type]
    return row


def start_chunk_server(ours: list[str], store: Path) -> tuple[subprocess.Popen, str]:
    """`pydesync chunk-server -s STORE` on a free 127.0.0.1 port, once it answers."""
    port = free_port_number()
    proc = subprocess.Popen([*ours, "chunk-server", "-s", str(store), "-l", f"127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chunk-server for {store} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"chunk-server for {store} did not start")


@contextlib.contextmanager
def chunk_servers(ours: list[str], stores: dict[str, Path]) -> Iterator[dict[str, str]]:
    """One pydesync chunk-server per tool's store on 127.0.0.1; yields their URLs; stops them."""
    procs: list[subprocess.Popen] = []
    try:
        urls = {}
        for tool in ("casync", "pydesync"):
            proc, urls[tool] = start_chunk_server(ours, stores[tool])
            procs.append(proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http_case(args: argparse.Namespace, casync: str, ours: list[str], blob: Path, stores: dict[str, Path],
              indexes: dict[str, Path], out: Path, _work: Path) -> tuple[list[dict[str, object]], list[str]]:
    """extract through our chunk-server: casync (its helper fetches one chunk at a time) from a server
    over the casync-made store, pydesync (-n parallel requests) from one over the pydesync store.
    Both servers are pydesync chunk-server processes on 127.0.0.1, on the same machine as the client,
    so the wall time includes the server's work."""
    def no_output(_tool: str) -> None:
        out.unlink(missing_ok=True)

    with chunk_servers(ours, stores) as urls:
        row = run_case("extract over HTTP", args.repeat, no_output,
                       [casync, "extract", f"--store={urls['casync']}", str(indexes["casync"]), str(out)],
                       [*ours, "extract", "-n", str(args.concurrency), "-s", urls["pydesync"],
                        str(indexes["pydesync"]), str(out)])
    same = filecmp.cmp(out, blob, shallow=False)  # the last run was pydesync's
    out.unlink(missing_ok=True)
    return [row], [f"extract over HTTP: output identical to the input: {same} "
                 f"(one chunk-server per tool on 127.0.0.1, pydesync -n {args.concurrency})"]


FAKE_SSH = Path(__file__).resolve().parent.parent / "scripts" / "fake-ssh"


def ssh_case(args: argparse.Namespace, casync: str, ours: list[str], blob: Path, stores: dict[str, Path],
             indexes: dict[str, Path], out: Path, _work: Path) -> tuple[list[dict[str, object]], list[str]]:
    """extract over casync's protocol: casync's client against `casync pull`, pydesync's client against
    `pydesync pull`, through a stand-in ssh that runs the remote command locally (so the transport is
    two pipes and no cipher: what remains is each tool's protocol handling)."""
    fake = FAKE_SSH
    remote = " ".join(ours)

    def no_output(_tool: str) -> None:
        out.unlink(missing_ok=True)

    env_casync = {**os.environ, "CASYNC_SSH_PATH": str(fake)}
    env_ours = {**os.environ, "CASYNC_SSH_PATH": str(fake), "CASYNC_REMOTE_PATH": remote}
    row = run_case("extract over ssh", args.repeat, no_output,
                   ["env", *[f"{k}={v}" for k, v in env_casync.items() if k.startswith("CASYNC")], casync,
                    "extract", f"--store=localhost:{stores['casync']}", str(indexes["casync"]), str(out)],
                   ["env", *[f"{k}={v}" for k, v in env_ours.items() if k.startswith("CASYNC")], *ours,
                    "extract", "-n", str(args.concurrency), "-s", f"ssh://localhost{stores['pydesync']}",
                    str(indexes["pydesync"]), str(out)])
    same = filecmp.cmp(out, blob, shallow=False)
    out.unlink(missing_ok=True)
    push, push_note = push_case("push over ssh", args, casync, ours, blob, _work, "localhost",
                                [f"CASYNC_SSH_PATH={fake}"])
    return [row, push], [f"extract over ssh: output identical to the input: {same} (stand-in ssh: local "
                         f"pipes, each client against its own tool's `pull`)", push_note]


def changed_copy(blob: Path, path: Path, seed: int) -> Path:
    """A copy of blob with 5% of it rewritten in 64 KiB pieces (an update). Patched in place, so
    this process stays small (children's peak RSS is measured)."""
    import random

    rng = random.Random(seed)
    shutil.copyfile(blob, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(max(1, size // 20 // 65536)):
            at = rng.randrange(0, max(1, size - 65536))
            os.pwrite(f.fileno(), rng.randbytes(min(65536, size - at)), at)
    return path


def seed_case(args: argparse.Namespace, casync: str, ours: list[str], blob: Path, stores: dict[str, Path],
              indexes: dict[str, Path], out: Path, work: Path) -> tuple[list[dict[str, object]], list[str]]:
    """An A/B update: v2 (the input with 5% of it rewritten in 64 KiB pieces) from an HTTP chunk-server,
    with v1 (the input) as seed: `casync extract --seed=v1` (casync chunks the seed itself) against
    `pydesync extract --seed v1.caibx:v1` (the seed's index is known)."""

    v2 = changed_copy(blob, work / "v2.bin", seed=7)
    v2_index = {"casync": work / "v2.casync.caibx", "pydesync": work / "v2.pydesync.caibx"}
    subprocess.run([casync, "make", f"--store={stores['casync']}", str(v2_index["casync"]), str(v2)],
                   check=True, capture_output=True)
    subprocess.run([*ours, "make", "-s", str(stores["pydesync"]), str(v2_index["pydesync"]), str(v2)],
                   check=True, capture_output=True)

    def no_output(_tool: str) -> None:
        out.unlink(missing_ok=True)

    try:
        with chunk_servers(ours, stores) as urls:
            row = run_case("extract v2, v1 seed", args.repeat, no_output,
                           [casync, "extract", f"--store={urls['casync']}", f"--seed={blob}",
                            str(v2_index["casync"]), str(out)],
                           [*ours, "extract", "-s", urls["pydesync"], "--seed",
                            f"{indexes['pydesync']}:{blob}", str(v2_index["pydesync"]), str(out)])
        same = filecmp.cmp(out, v2, shallow=False)
        out.unlink(missing_ok=True)
    finally:
        v2.unlink(missing_ok=True)
    return [row], [f"extract v2 with v1 as seed over HTTP: output identical to v2: {same} (5% of v1 "
                   "rewritten in 64 KiB pieces; one chunk-server per tool on 127.0.0.1)"]


def sync_note(ours: list[str], blob: Path, work: Path) -> list[str]:
    """remotesync against chunk-by-chunk HTTP for a 5% change: pydesync extract of v2 with v1 as seed
    through one chunk-server, with and without --sync; requests counted from the server's log."""
    v2 = changed_copy(blob, work / "sync-v2.bin", seed=8)
    store, idx = work / "sync.castr", work / "sync-idx"
    idx.mkdir()
    for name, path in (("v1", blob), ("v2", v2)):
        subprocess.run([*ours, "make", "-s", str(store), str(idx / f"{name}.caibx"), str(path)], check=True,
                       capture_output=True)
    port = free_port_number()
    log = work / "sync-access.log"
    proc = subprocess.Popen([*ours, "chunk-server", "-s", str(store), "-l", f"127.0.0.1:{port}",
                             "--sync-index-store", str(idx), "--log", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = work / "sync-out.bin"
    results = []
    try:
        time.sleep(1)
        for mode in ("chunk by chunk", "--sync"):
            log.write_text("")
            out.unlink(missing_ok=True)
            extra = ["--sync", f"http://127.0.0.1:{port}/sync/v2.caibx"] if mode == "--sync" else []
            seconds, _ = timed([*ours, "extract", *extra, "-s", f"http://127.0.0.1:{port}/", "--seed",
                                f"{idx / 'v1.caibx'}:{blob}", str(idx / "v2.caibx"), str(out)])
            same = filecmp.cmp(out, v2, shallow=False)
            requests = len(log.read_text().splitlines())
            results.append(f"{mode}: {seconds:.2f} s, {requests} requests, identical: {same}")
    finally:
        proc.terminate()
        proc.wait()
        v2.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    return ["v2 (5% changed) with v1 as seed from a chunk-server on 127.0.0.1: " + "; ".join(results)]


def free_port_number() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mount_note(ours: list[str], index: Path, store: Path, blob: Path, out: Path, work: Path) -> list[str]:
    """Sequential read of the blob through `mount-index` (cat > /dev/null) against `extract` of it,
    both pydesync, both from the local store (needs root and FUSE)."""
    mnt = work / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*ours, "mount-index", "-s", str(store), str(index), str(mnt)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        target = mnt / index.name.rsplit(".", 1)[0]
        deadline = time.monotonic() + 30
        while not target.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                return [f"mount row skipped: mount-index did not start: {proc.stderr.read().decode()[-300:]}"]
            time.sleep(0.05)
        read_s, _ = timed(["bash", "-c", f"cat {target} > /dev/null"])
        again_s, _ = timed(["bash", "-c", f"cat {target} > /dev/null"])
        same = filecmp.cmp(target, blob, shallow=False)
    finally:
        proc.terminate()
        proc.wait(30)
    out.unlink(missing_ok=True)
    extract_s, _ = timed([*ours, "extract", "-s", str(store), str(index), str(out)])
    out.unlink(missing_ok=True)
    rate = blob.stat().st_size / read_s / 1e6
    return [f"mount-index: sequential read {read_s:.2f} s ({rate:.0f} MB/s), again {again_s:.2f} s (page "
            f"cache), extract {extract_s:.2f} s of the same index and store; content identical: {same}"]


def s3_note(ours: list[str], blob: Path, work: Path) -> list[str]:
    """make (empty bucket, then full) and extract of the input's first 64 MiB on moto's S3 server on
    127.0.0.1 (pip install 'moto[server]' boto3): wall and client CPU, per chunk. The server shares
    the machine, so wall times are moto's as much as ours; the client's CPU is the figure to compare
    (desync's was 1.1 ms per chunk where this issue was measured)."""
    try:
        import boto3
    except ImportError:
        return ["s3 note skipped: boto3 and moto not installed"]
    part = work / "s3-input.bin"
    with open(part, "wb") as out:  # (by a child: read here, it would inflate later children's peak RSS)
        subprocess.run(["head", "-c", str(64 << 20), str(blob)], stdout=out, check=True)
    port = free_port_number()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                return ["s3 note skipped: moto's server did not start"]
            time.sleep(0.1)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
        store = f"s3+http://127.0.0.1:{port}/bench/store/"
        index, out = work / "s3.caibx", work / "s3-out.bin"
        make = timed_cpu([*ours, "make", "-s", store, str(index), str(part)], env)
        full = timed_cpu([*ours, "make", "-s", store, str(index), str(part)], env)
        get = timed_cpu([*ours, "extract", "-s", store, str(index), str(out)], env)
        same = filecmp.cmp(out, part, shallow=False)
        chunks = (index.stat().st_size - 120) // 40
    finally:
        server.terminate()
        server.wait(30)
    rows = [(name, wall, cpu) for name, (wall, _rss, cpu) in
            (("make, empty bucket", make), ("make, full bucket", full), ("extract", get))]
    cells = [f"{name} {wall:.2f} s wall, client CPU {cpu:.2f} s ({cpu / chunks * 1000:.2f} ms per chunk)"
             for name, wall, cpu in rows]
    return [f"s3 (moto on 127.0.0.1, 64 MiB, {chunks} chunks): {'; '.join(cells)}; output identical: {same}"]


def sshd_case(args: argparse.Namespace, casync: str, ours: list[str], blob: Path, stores: dict[str, Path],
              indexes: dict[str, Path], out: Path, work: Path) -> tuple[list[dict[str, object]], list[str]]:
    """extract over a real sshd on 127.0.0.1 (tests/sshd_util.py: keys made for the run): casync's
    client against `casync pull`, pydesync's against `pydesync pull`, both paying ssh's cipher."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from sshd_util import throwaway_sshd

    d = work / "sshd"
    d.mkdir()

    def no_output(_tool: str) -> None:
        out.unlink(missing_ok=True)

    with throwaway_sshd(d) as (_port, wrapper):
        remote = " ".join(ours)  # absolute interpreter: the remote shell's PATH may lack pydesync
        row = run_case("extract over sshd", args.repeat, no_output,
                       ["env", f"CASYNC_SSH_PATH={wrapper}", casync, "extract",
                        f"--store=127.0.0.1:{stores['casync']}", str(indexes["casync"]), str(out)],
                       ["env", f"CASYNC_SSH_PATH={wrapper}", f"CASYNC_REMOTE_PATH={remote}", *ours,
                        "extract", "-n", str(args.concurrency), "-s", f"ssh://127.0.0.1{stores['pydesync']}",
                        str(indexes["pydesync"]), str(out)])
        cipher = subprocess.run([wrapper, "-G", "127.0.0.1"], capture_output=True, text=True).stdout
        ciphers = next((line.split(" ", 1)[1] for line in cipher.splitlines() if line.startswith("ciphers ")),
                       "?")
        push, push_note = push_case("push over sshd", args, casync, ours, blob, work, "127.0.0.1",
                                    [f"CASYNC_SSH_PATH={wrapper}"])
    same = filecmp.cmp(out, blob, shallow=False)
    out.unlink(missing_ok=True)
    return [row, push], [f"extract over sshd: output identical to the input: {same} (real sshd on 127.0.0.1, "
                         f"client ciphers {ciphers.split(',')[0]} first; each client against its own tool's "
                         f"`pull`)", push_note]


def push_case(name: str, args: argparse.Namespace, casync: str, ours: list[str], blob: Path, work: Path,
              host: str, env: list[str]) -> tuple[dict[str, object], str]:
    """make into a remote index and store (an empty store each run): casync's make against `casync
    push`, pydesync's against `pydesync push`, through the given ssh."""
    remote = work / f"{name.replace(' ', '-')}"
    remote.mkdir()
    where = {tool: (remote / f"{tool}.castr", remote / f"{tool}.caibx") for tool in ("casync", "pydesync")}

    def empty(tool: str) -> None:
        shutil.rmtree(where[tool][0], ignore_errors=True)
        where[tool][1].unlink(missing_ok=True)

    (cs, ci), (ps, pi) = where["casync"], where["pydesync"]
    row = run_case(name, args.repeat, empty,
                   ["env", *env, casync, "make", f"--store={host}:{cs}", f"{host}:{ci}", str(blob)],
                   ["env", *env, f"CASYNC_REMOTE_PATH={' '.join(ours)}", *ours, "make", "-n",
                    str(args.concurrency), "-s", f"ssh://{host}{ps}", f"ssh://{host}{pi}", str(blob)])
    same = ci.read_bytes() == pi.read_bytes()
    return row, (f"{name}: indexes identical: {same} (each make against its own tool's `push`, into an "
                 f"empty remote store)")


def tree_cases(args: argparse.Namespace, casync: str, ours: list[str],
               work: Path) -> tuple[list[dict[str, object]], list[str]]:
    """tar (casync make X.catar TREE) and untar (casync extract X.catar DIR) rows, plus notes."""
    tree = args.tree
    if not os.path.isdir(tree):
        return [], [f"tree rows skipped: {tree} is not a directory"]
    catar = {"casync": work / "casync.catar", "pydesync": work / "pydesync.catar"}
    out = {"casync": work / "casync.out", "pydesync": work / "pydesync.out"}

    def no_catar(tool: str) -> None:
        catar[tool].unlink(missing_ok=True)

    def no_tree(tool: str) -> None:
        shutil.rmtree(out[tool], ignore_errors=True)

    rows = [run_case("tar", args.repeat, no_catar, [casync, "make", str(catar["casync"]), tree],
                     [*ours, "tar", str(catar["pydesync"]), tree])]
    size = catar["casync"].stat().st_size
    same = filecmp.cmp(catar["casync"], catar["pydesync"], shallow=False)
    notes = [f"tar of {tree}: {size} bytes ({size / 2**20:.0f} MiB), archives identical: {same}"]
    catar["pydesync"].unlink()
    has_untar = subprocess.run([*ours, "untar", "-h"], capture_output=True).returncode == 0
    if not has_untar:
        notes.append("untar row skipped: this pydesync has no untar command")
        return rows, notes
    rows.append(run_case("untar", args.repeat, no_tree,
                         [casync, "extract", str(catar["casync"]), str(out["casync"])],
                         [*ours, "untar", str(catar["casync"]), str(out["pydesync"])]))
    digests = [subprocess.run([casync, "digest", str(out[t])], capture_output=True, text=True).stdout.strip()
               for t in ("casync", "pydesync")]
    notes.append(f"untar: restored trees identical (casync digest): {digests[0] == digests[1] != ''}")
    for tool in out:
        no_tree(tool)
    return rows, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="input size (default 1G; 256M for a quick run)")
    ap.add_argument("--input", choices=["real", "random", "sparse"], default="real")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool and case (median)")
    ap.add_argument("--dir", default="/dev/shm", help="where inputs and stores go (tmpfs)")
    ap.add_argument("-n", "--concurrency", type=int, default=10, help="pydesync -n")
    ap.add_argument("--tree", default="/usr/share",
                    help="directory for the tar/untar rows (default /usr/share)")
    ap.add_argument("--no-tree", action="store_true", help="skip the tar/untar rows")
    ap.add_argument("--ssh", action="store_true",
                    help="add extract over casync's protocol (stand-in ssh; casync pull vs pydesync pull)")
    ap.add_argument("--seed", action="store_true",
                    help="add extract of a 5%%-changed v2 from HTTP with the input as seed (casync --seed)")
    ap.add_argument("--sync", action="store_true",
                    help="add a note: extract --sync (one round trip) against chunk-by-chunk HTTP")
    ap.add_argument("--mount", action="store_true",
                    help="add a note: sequential read through mount-index against extract (root, FUSE)")
    ap.add_argument("--sshd", action="store_true",
                    help="add extract over a real sshd on 127.0.0.1 (keys made for the run)")
    ap.add_argument("--s3", action="store_true",
                    help="add a note: make/extract of 64 MiB on moto's S3 server on 127.0.0.1, client CPU")
    ap.add_argument("--http", action="store_true",
                    help="add extract through pydesync chunk-server on 127.0.0.1 (casync vs pydesync client)")
    args = ap.parse_args()
    casync = shutil.which("casync")
    if not casync:
        raise SystemExit("casync is not installed (apt-get install casync)")
    ours = [sys.executable, "-m", "pydesync"]
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="pydesync-bench-", dir=args.dir))
    try:
        blob = work / "input.bin"
        make_input(args.input, size, blob)
        cs, ps = work / "casync.castr", work / "pydesync.castr"
        ci, pi = work / "casync.caibx", work / "pydesync.caibx"
        out = work / "out.bin"

        def empty_stores(_tool: str) -> None:
            for s in (cs, ps):
                shutil.rmtree(s, ignore_errors=True)

        def no_output(_tool: str) -> None:
            out.unlink(missing_ok=True)

        n = ["-n", str(args.concurrency)]
        rows = [
            run_case("make, empty store", args.repeat, empty_stores,
                     [casync, "make", f"--store={cs}", str(ci), str(blob)],
                     [*ours, "make", *n, "-s", str(ps), str(pi), str(blob)]),
            run_case("make, full store", args.repeat, lambda _tool: None,
                     [casync, "make", f"--store={cs}", str(ci), str(blob)],
                     [*ours, "make", *n, "-s", str(ps), str(pi), str(blob)]),
            run_case("extract", args.repeat, no_output,
                     [casync, "extract", f"--store={cs}", str(ci), str(out)],
                     [*ours, "extract", *n, "-s", str(ps), str(pi), str(out)]),
        ]
        same = ci.read_bytes() == pi.read_bytes()
        notes: list[str] = []
        stores, indexes = {"casync": cs, "pydesync": ps}, {"casync": ci, "pydesync": pi}
        for wanted, case in ((args.http, http_case), (args.ssh, ssh_case), (args.seed, seed_case),
                             (args.sshd, sshd_case)):
            if wanted:
                case_rows, case_notes = case(args, casync, ours, blob, stores, indexes, out, work)
                rows += case_rows
                notes += case_notes
        if args.mount:
            notes += mount_note(ours, pi, ps, blob, out, work)
        if args.sync:
            notes += sync_note(ours, blob, work)
        if args.s3:
            notes += s3_note(ours, blob, work)
        if not args.no_tree:
            empty_stores("")
            no_output("")
            tree_rows, tree_notes = tree_cases(args, casync, ours, work)
            rows += tree_rows
            notes += tree_notes
        print(f"input: {args.input}, {size} bytes; indexes identical: {same}; repeat {args.repeat}; "
              f"native per-chunk path (_chunkio): {native_path()}")
        # last: reading the input into this process would inflate the children's peak RSS (fork)
        print(f"C scan alone, one core: {scan_throughput(blob):.0f} MB/s")
        floors = floor_seconds(blob)
        print(f"{'case':<20} {'casync s':>9} {'pydesync s':>11} {'ratio':>6} {'floor s':>8} {'/floor':>7} "
              f"{'casync MiB':>11} {'pydesync MiB':>13}")
        for r in rows:
            floor = floors.get(str(r["case"]))
            floor_cells = f"{floor:>8.2f} {float(r['pydesync']) / floor:>6.2f}x" if floor else " " * 16
            print(f"{r['case']:<20} {r['casync']:>9.2f} {r['pydesync']:>11.2f} {r['ratio']:>5.2f}x "
                  f"{floor_cells} {r['casync_rss']:>11.0f} {r['pydesync_rss']:>13.0f}")
        print(f"floor: one-core CPU of scan + SHA512/256 (+ zstd -3 for an empty store; hash + zstd -d for "
              f"extract) over {os.cpu_count()} cores; reads, writes and file operations left out")
        for note in notes:
            print(note)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
