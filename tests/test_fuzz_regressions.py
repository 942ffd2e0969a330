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


def test_saved_crashes_now_fail_cleanly():
    if not CRASHES.is_dir() or not list(CRASHES.glob("*.bin")):
        pytest.skip("no saved fuzz crashes")
    r = run("--replay", str(CRASHES))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("target", ["index", "catar", "protocol", "remotesync"])
def test_short_fuzz_run(target: str):
    r = run("--target", target, "--seconds", "3", "--seed", "11")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{target}: " in r.stdout and " 0 failures" in r.stdout
