#!/usr/bin/env python3
"""Time pydesync against the real casync on the same input, alternating, in one run.

Follows ../shared/spec/BENCHMARKS.md: inputs and stores on tmpfs (/dev/shm),
ratios rather than absolute times, median of --repeat runs.

    python3 bench/bench.py                 # real-1g (tar of /usr/share /usr/lib, 1 GiB)
    python3 bench/bench.py --size 256M     # quicker
    python3 bench/bench.py --input random  # incompressible input
    python3 bench/bench.py --input sparse --size 8G --repeat 1   # peak RSS on a huge input
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss


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


def run_case(name: str, repeat: int, prepare: Callable[[], None],
             casync_cmd: list[str], ours_cmd: list[str]) -> dict[str, object]:
    results: dict[str, list[tuple[float, int]]] = {"casync": [], "pydesync": []}
    for _ in range(repeat):
        for tool, cmd in (("casync", casync_cmd), ("pydesync", ours_cmd)):
            prepare()
            results[tool].append(timed(cmd))
    row: dict[str, object] = {"case": name}
    for tool, runs in results.items():
        row[tool] = statistics.median(w for w, _ in runs)
        row[f"{tool}_rss"] = max(r for _, r in runs) / 1024
    row["ratio"] = float(row["casync"]) / float(row["pydesync"])  # type: ignore[arg-type]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="input size (default 1G; 256M for a quick run)")
    ap.add_argument("--input", choices=["real", "random", "sparse"], default="real")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool and case (median)")
    ap.add_argument("--dir", default="/dev/shm", help="where inputs and stores go (tmpfs)")
    ap.add_argument("-n", "--concurrency", type=int, default=10, help="pydesync -n")
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

        def empty_stores() -> None:
            for s in (cs, ps):
                shutil.rmtree(s, ignore_errors=True)

        def no_output() -> None:
            out.unlink(missing_ok=True)

        n = ["-n", str(args.concurrency)]
        rows = [
            run_case("make, empty store", args.repeat, empty_stores,
                     [casync, "make", f"--store={cs}", str(ci), str(blob)],
                     [*ours, "make", *n, "-s", str(ps), str(pi), str(blob)]),
            run_case("make, full store", args.repeat, lambda: None,
                     [casync, "make", f"--store={cs}", str(ci), str(blob)],
                     [*ours, "make", *n, "-s", str(ps), str(pi), str(blob)]),
            run_case("extract", args.repeat, no_output,
                     [casync, "extract", f"--store={cs}", str(ci), str(out)],
                     [*ours, "extract", *n, "-s", str(ps), str(pi), str(out)]),
        ]
        same = ci.read_bytes() == pi.read_bytes()
        print(f"input: {args.input}, {size} bytes; indexes identical: {same}; repeat {args.repeat}")
        print(f"C scan alone, one core: {scan_throughput(blob):.0f} MB/s")
        print(f"{'case':<20} {'casync s':>9} {'pydesync s':>11} {'ratio':>6} {'casync MiB':>11} "
              f"{'pydesync MiB':>13}")
        for r in rows:
            print(f"{r['case']:<20} {r['casync']:>9.2f} {r['pydesync']:>11.2f} {r['ratio']:>5.2f}x "
                  f"{r['casync_rss']:>11.0f} {r['pydesync_rss']:>13.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
