"""The fuzz harness (fuzz/fuzz_parsers.py) in the suite: saved crashes replay as clean errors, and a
short fixed-seed run of every target finds nothing. Long runs: `python3 fuzz/fuzz_parsers.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_parsers.py"
CRASHES = FUZZ.parent / "crashes"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FUZZ), *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_saved_crashes_now_fail_cleanly(tmp_path: Path):
    """Every input saved in fuzz/crashes (and a few hostile ones made here) gives a clean error."""
    hostile = {"index-empty.bin": b"", "catar-garbage.bin": b"\xff" * 64, "protocol-huge.bin": b"\xff" * 16,
               "remotesync-json.bin": b'{"Chunks":[{"Key":"zz","Size":-1}],"Perm":[0,0]}'}
    for name, data in hostile.items():
        (tmp_path / name).write_bytes(data)
    for saved in (CRASHES.glob("*.bin") if CRASHES.is_dir() else ()):
        (tmp_path / saved.name).write_bytes(saved.read_bytes())
    r = run("--replay", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok") == len(list(tmp_path.glob("*.bin")))


@pytest.mark.parametrize("target", ["index", "catar", "protocol", "remotesync"])
def test_short_fuzz_run(target: str):
    r = run("--target", target, "--seconds", "3", "--seed", "11")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{target}: " in r.stdout and " 0 failures" in r.stdout
