#!/usr/bin/env python3
"""Load on chunk-server: many concurrent clients on 127.0.0.1 for a fixed time.

    python3 bench/load.py                          # 64 clients, 20 s, a 256 MiB store made here
    python3 bench/load.py --clients 200 --seconds 60 --store /dev/shm/x.castr
    python3 bench/load.py --wrk --clients 200     # the load from wrk (Debian's package) instead

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
import socket
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


def run_wrk(port: int, paths: list[tuple[str, int]], clients: int, seconds: float, work: Path) -> None:
    """wrk against the server; prints its rate, latency percentiles and errors."""
    script = work / "paths.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f'"{p}"' for p, _ in paths))
    out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:.0f}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = re.findall(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out)
    print(f"chunk-server under wrk, {clients} connections, {seconds:.0f} s, {len(paths)} chunks on 127.0.0.1 "
          f"({os.cpu_count()} cores shared by wrk and the server)")
    failures = "; ".join(errors) or "none"
    print(f"requests {total.group(1) if total else '?'}, {float(rate.group(1)) if rate else 0:.0f}/s; "
          f"latency p50 {pct.get('50', '?')}, p99 {pct.get('99', '?')}; errors: {failures}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--store", type=Path, help="existing local store (default: 256 MiB of random data)")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--wrk", action="store_true", help="load from wrk instead of Python threads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pydesync-load-", dir=args.dir) as d:
        store = args.store or make_store(Path(d), 256 << 20)
        paths = chunk_paths(store)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "pydesync", "chunk-server", "-s", str(store), "-l",
                                   f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            if args.wrk:
                run_wrk(port, paths, args.clients, args.seconds, Path(d))
                return 0
            latencies: list[list[float]] = [[] for _ in range(args.clients)]
            errors: list[str] = []
            stop = time.monotonic() + args.seconds

            def client(i: int) -> None:
                http = FastHttp(f"http://127.0.0.1:{port}/", 30, None, {})
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
