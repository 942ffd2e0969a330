#!/usr/bin/env python3
"""Load on chunk-server: many concurrent clients on 127.0.0.1 for a fixed time.

    python3 bench/load.py                          # 64 clients, 20 s, a 256 MiB store made here
    python3 bench/load.py --clients 200 --seconds 60 --store /dev/shm/x.castr
    python3 bench/load.py --wrk --clients 200     # the load from wrk (Debian's package) instead
    python3 bench/load.py --wrk --tls             # over TLS (a self-signed certificate made here)
    python3 bench/load.py --idle 10000            # the server's memory with 10,000 idle connections
    python3 bench/load.py --pydesync /tmp/old     # the server of another checkout (before/after)
    python3 bench/load.py --stalled 5000 --server-args="--max-uploads 6000"   # uploads that never end

Each client is a process-local thread with its own kept-alive connection, requesting random chunks
of the store (GET, with a HEAD every tenth request) as fast as the server answers, and checking
each answer's status and length. Reports requests per second, latency percentiles and errors
(any status but 200, a short body, a dropped connection). With --wrk, wrk (C, 2 threads) makes
the same GETs of random chunks, so the figure is the server's, not our Python client's; it reports
non-2xx answers and socket errors. Not a test: no assertions, numbers only.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from pydesync.store.http_fast import FastHttp  # noqa: E402


def make_store(work: Path, size: int) -> Path:
    blob = work / "load.bin"
    rng = random.Random(1)
    with open(blob, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(rng.randbytes(1 << 20))
    store = work / "load.castr"
    subprocess.run([sys.executable, "-m", "pydesync", "make", "-s", str(store), str(work / "load.caibx"),
                    str(blob)], check=True)
    blob.unlink()
    return store


def chunk_paths(store: Path) -> list[tuple[str, int]]:
    return [(f"/{p.parent.name}/{p.name}", p.stat().st_size) for p in store.glob("*/*.cacnk")]


WRK_SCRIPT = """
paths = {%s}
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""


def run_wrk(port: int, paths: list[tuple[str, int]], clients: int, seconds: float, work: Path,
            tls: bool = False) -> None:
    """wrk against the server; prints its rate, latency percentiles and errors."""
    script = work / "paths.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f'"{p}"' for p, _ in paths))
    scheme = "https" if tls else "http"
    out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:.0f}s", "--latency",
                          "-s", str(script), f"{scheme}://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = re.findall(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out)
    print(f"chunk-server under wrk ({scheme}), {clients} connections, {seconds:.0f} s, {len(paths)} chunks "
          f"on 127.0.0.1 ({os.cpu_count()} cores shared by wrk and the server)")
    failures = "; ".join(errors) or "none"
    print(f"requests {total.group(1) if total else '?'}, {float(rate.group(1)) if rate else 0:.0f}/s; "
          f"latency p50 {pct.get('50', '?')}, p99 {pct.get('99', '?')}; errors: {failures}")


def raise_descriptors() -> None:
    """Soft limit on open files up to the hard one (for many connections, and for servers that
    do not raise it themselves)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def self_signed(work: Path) -> tuple[Path, Path]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def start_server(store: Path, tree: Path, tls: tuple[Path, Path] | None,
                 extra_args: list[str]) -> tuple[subprocess.Popen, int]:
    """chunk-server of the checkout `tree` on a free port, once it accepts connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = (["--cert", str(tls[0]), "--key", str(tls[1])] if tls else []) + extra_args
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    argv = [sys.executable, "-m", "pydesync", "chunk-server", "-s", str(store), "-l", f"127.0.0.1:{port}",
            *extra]
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, preexec_fn=raise_descriptors)
    while server.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, port
        time.sleep(0.05)
    raise SystemExit("chunk-server did not start")


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_memory(server: subprocess.Popen, port: int, count: int) -> None:
    """Open `count` connections that send nothing; the server's RSS before and once it holds them."""
    raise_descriptors()
    before, fds = rss_kib(server.pid), open_fds(server.pid)
    conns = []
    for _ in range(count):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        conns.append(s)
    while open_fds(server.pid) < fds + count and server.poll() is None:
        time.sleep(0.1)
    time.sleep(1)
    after = rss_kib(server.pid)
    held = open_fds(server.pid) - fds
    alive = server.poll() is None
    for s in conns:
        s.close()
    state = "running" if alive else "ended"
    print(f"chunk-server with {count} idle connections ({held} held, server {state}): "
          f"RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after, "
          f"{(after - before) / max(1, held):.2f} KiB per connection")


def threads_of(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))  # type: ignore[union-attr]


def stalled_uploads(server: subprocess.Popen, port: int, count: int, paths: list[tuple[str, int]]) -> None:
    """`count` PUTs that send their head and 10 bytes of a 1 MB body, then nothing: the server's
    threads and RSS while they hang, and how long a GET takes once they have all closed."""
    raise_descriptors()
    before = rss_kib(server.pid)
    conns = []
    for i in range(count):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        path = paths[i % len(paths)][0]
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789".encode())
        conns.append(s)
    time.sleep(2)
    threads, during = threads_of(server.pid), rss_kib(server.pid)
    for s in conns:
        s.close()
    started = time.monotonic()
    http = FastHttp(f"http://127.0.0.1:{port}/", 120, None, {})
    status = http.request("GET", paths[0][0]).status
    took = time.monotonic() - started
    http.close()
    print(f"chunk-server with {count} stalled uploads: {threads} threads, RSS {before / 1024:.1f} -> "
          f"{during / 1024:.1f} MiB; after they closed, a GET answered {status} in {took * 1e3:.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--store", type=Path, help="existing local store (default: 256 MiB of random data)")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--wrk", action="store_true", help="load from wrk instead of Python threads")
    ap.add_argument("--tls", action="store_true", help="over TLS (wrk or the Python clients)")
    ap.add_argument("--idle", type=int, default=0, metavar="N", help="measure memory of N idle connections")
    ap.add_argument("--stalled", type=int, default=0, metavar="N",
                    help="measure N uploads that never finish their body (the server runs with -w)")
    ap.add_argument("--server-args", default="", help="more chunk-server arguments (one string)")
    ap.add_argument("--pydesync", type=Path, default=HERE.parent, metavar="CHECKOUT",
                    help="the checkout whose server runs (default: this one; its C extensions built)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pydesync-load-", dir=args.dir) as d:
        store = args.store or make_store(Path(d), 256 << 20)
        paths = chunk_paths(store)
        tls = self_signed(Path(d)) if args.tls else None
        extra = args.server_args.split() + (["-w"] if args.stalled else [])
        server, port = start_server(store, args.pydesync.resolve(), tls, extra)
        try:
            if args.stalled:
                stalled_uploads(server, port, args.stalled, paths)
                return 0
            if args.idle:
                idle_memory(server, port, args.idle)
                return 0
            if args.wrk:
                run_wrk(port, paths, args.clients, args.seconds, Path(d), tls is not None)
                return 0
            latencies: list[list[float]] = [[] for _ in range(args.clients)]
            errors: list[str] = []
            stop = time.monotonic() + args.seconds

            context = ssl._create_unverified_context() if tls else None

            def client(i: int) -> None:
                http = FastHttp(f"{'https' if tls else 'http'}://127.0.0.1:{port}/", 30, context, {})
                rng = random.Random(i)
                while time.monotonic() < stop:
                    path, size = rng.choice(paths)
                    method = "HEAD" if rng.random() < 0.1 else "GET"
                    started = time.perf_counter()
                    try:
                        answer = http.request(method, path)
                        if answer.status != 200 or (method == "GET" and len(answer.data) != size):
                            errors.append(f"{method} {path}: {answer.status}, {len(answer.data)} bytes")
                    except OSError as e:
                        errors.append(f"{method} {path}: {e}")
                    latencies[i].append(time.perf_counter() - started)
                http.close()

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            server.terminate()
            server.wait()
    every = sorted(x for per in latencies for x in per)
    q = statistics.quantiles(every, n=100)
    print(f"chunk-server, {args.clients} clients, {args.seconds:.0f} s, {len(paths)} chunks on 127.0.0.1 "
          f"({os.cpu_count()} cores shared by clients and server)")
    print(f"requests {len(every)}, {len(every) / args.seconds:.0f}/s; latency p50 {q[49] * 1e3:.1f} ms, "
          f"p99 {q[98] * 1e3:.1f} ms, max {every[-1] * 1e3:.1f} ms; errors {len(errors)}")
    for e in errors[:5]:
        print("  " + e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
