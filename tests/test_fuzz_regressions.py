"""The fuzz harness (fuzz/fuzz_parsers.py) in the suite: saved crashes replay as clean errors, a
short fixed-seed run of every target finds nothing, and the coverage-guided engine runs. Long runs:
`python3 fuzz/fuzz_parsers.py --engine atheris --seconds 600`."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need
from procutil import HANG_GUARD

FUZZ = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_parsers.py"
CRASHES = FUZZ.parent / "crashes"


def run(*args: str) -> subprocess.CompletedProcess:
    """The harness with a per-case hang limit far above any case's run time (a loaded machine is
    not a hang)."""
    argv = [sys.executable, str(FUZZ), "--case-seconds", str(int(HANG_GUARD) // 2), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=HANG_GUARD * 2,
                          stdin=subprocess.DEVNULL)


def test_saved_crashes_now_fail_cleanly(tmp_path: Path):
    """Every input saved in fuzz/crashes (and a few hostile ones made here) gives a clean error."""
    hostile = {"index-empty.bin": b"", "catar-garbage.bin": b"\xff" * 64, "protocol-huge.bin": b"\xff" * 16,
               "remotesync-json.bin": b'{"Chunks":[{"Key":"zz","Size":-1}],"Perm":[0,0]}',
               "session-short.bin": b"\x18" + bytes(7), "chunk-bomb.bin": b"\x28\xb5\x2f\xfd\x00\x38"
               + ((128 << 13 | 2).to_bytes(3, "little") + b"A") * 2000,
               # a superscript digit passed str.isdigit() and failed int(): a 500 from the handler
               "httpserver-length.bin": f"PUT /abab/{'ab' * 32}.cacnk HTTP/1.1\r\nContent-Length: ²\r\n\r\n"
               .encode("latin-1"),
               "httpclient-huge.bin": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"}
    for name, data in hostile.items():
        (tmp_path / name).write_bytes(data)
    for saved in (CRASHES.glob("*.bin") if CRASHES.is_dir() else ()):
        (tmp_path / saved.name).write_bytes(saved.read_bytes())
    r = run("--replay", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok") == len(list(tmp_path.glob("*.bin")))


TARGETS = ["index", "catar", "protocol", "session", "remotesync", "chunk", "httpserver", "httpclient"]


# A fixed number of cases, not a time: the same cases run however loaded the machine is.
BUDGET = ["--runs", "200"]


@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run(target: str, tmp_path: Path):
    r = run("--target", target, *BUDGET, "--seed", "11", "--crashes", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"^{target}: 200 cases, 0 failures$", r.stdout, re.M), r.stdout


def test_coverage_guided_engine_runs(tmp_path: Path):
    """atheris (the `fuzz` extra) over one target for 3,000 runs: it starts, learns inputs into the
    corpus and finds nothing."""
    need(importlib.util.find_spec("atheris") is not None, "atheris is not installed (pip install .[fuzz])")
    r = run("--engine", "atheris", "--target", "chunk", "--runs", "3000", "--corpus", str(tmp_path),
            "--crashes", str(tmp_path / "crashes"))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert re.search(r"^chunk: 3000 cases, 0 failures$", r.stdout, re.M), r.stdout
    assert len(list((tmp_path / "chunk").iterdir())) > 6  # the seeds and what it learnt
