"""Progress on stderr: desync's parsable lines (DESYNC_ENABLE_PARSABLE_PROGRESS, read by RAUC),
nothing when stderr is not a terminal, and the same rules for every long command."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from conftest import run_cli

from pydesync.cli.progress import Progress

LINE = re.compile(r"^(?P<prefix>.*?)\s+(?P<pct>\d+\.\d\d)% (?P<time>\d\dm\d\ds)$")
COUNT = re.compile(r"^(?P<prefix>.*?)\s+(?P<n>\d+) (bytes|chunks|chunks deleted) \d\dm\d\ds$")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blob and a tree to work on (read only: each test works in a folder of its own)."""
    d = tmp_path_factory.mktemp("progress-inputs")
    (d / "blob").write_bytes(random.Random(1).randbytes(3 << 20))
    (d / "tree").mkdir()
    (d / "tree" / "f").write_bytes(random.Random(2).randbytes(1 << 20))
    return d


# What each command needs made first (quietly): a store and index, or an archive.
STORE = [["make", "-s", "{d}/store", "{d}/b.caibx", "{i}/blob"]]
ARCHIVE = [["tar", "{d}/t.catar", "{i}/tree"]]


def lines_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def run_in(d: Path, i: Path, command: list[str], env: dict[str, str] | None = None):
    return run_cli(*[a.format(d=d, i=i) for a in command], env=env)


@pytest.mark.parametrize(("command", "prefix", "before"), [
    (["make", "-s", "{d}/store", "{d}/b.caibx", "{i}/blob"], "Chunking", []),
    (["extract", "-s", "{d}/store", "{d}/b.caibx", "{d}/out"], "Attempt 1: Assembling", STORE),
    (["cache", "-s", "{d}/store", "-c", "{d}/cache", "{d}/b.caibx"], "", STORE),
    (["tar", "{d}/t.catar", "{i}/tree"], "Packing", []),
    (["untar", "{d}/t.catar", "{d}/untarred"], "Unpacking", ARCHIVE),
    (["verify", "-s", "{d}/store"], "Verifying", STORE),
    (["prune", "-y", "-s", "{d}/store", "{d}/b.caibx"], "Pruning", STORE),
])
def test_parsable_progress_lines(inputs: Path, tmp_path: Path, command: list[str], prefix: str,
                                 before: list[list[str]]):
    for step in before:
        assert run_in(tmp_path, inputs, step).returncode == 0
    r = run_in(tmp_path, inputs, command, env={"DESYNC_ENABLE_PARSABLE_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    lines = lines_of(r.stderr)
    assert lines, "no progress printed"
    for line in lines:
        match = LINE.match(line) or COUNT.match(line)
        assert match and match["prefix"] == prefix, line
    last = LINE.match(lines[-1])
    if last:  # a known total ends at 100%
        assert last["pct"] == "100.00"


def test_no_progress_when_stderr_is_not_a_terminal(inputs: Path, tmp_path: Path):
    assert run_in(tmp_path, inputs, STORE[0]).returncode == 0
    r = run_cli("extract", "-s", tmp_path / "store", tmp_path / "b.caibx", tmp_path / "out2")
    assert r.returncode == 0 and r.stderr == ""


def test_progress_line_format():
    bar = Progress("Attempt 1: Assembling ", 200, mode="lines")
    assert bar.line() == "Attempt 1: Assembling   0.00%"
    bar.add(50)
    assert re.fullmatch(r"Attempt 1: Assembling   25\.00% \d\dm\d\ds", bar.line())
    assert bar.callback() == bar.add
    assert Progress("x", 1, mode=None).callback() is None


@pytest.mark.parametrize(("command", "label", "unit"), [
    (["make", "-s", "{d}/store", "{d}/b.caibx", "{i}/blob"], "Chunking", "B/s"),
    (["extract", "-s", "{d}/store", "{d}/b.caibx", "{d}/out"], "Attempt 1: Assembling", "chunks/s"),
    (["cache", "-s", "{d}/store", "-c", "{d}/cache", "{d}/b.caibx"], "Caching", "chunks/s"),
    (["tar", "{d}/t.catar", "{i}/tree"], "Packing", "B/s"),
    (["verify", "-s", "{d}/store"], "Verifying", "chunks/s"),
    (["prune", "-y", "-s", "{d}/store", "{d}/b.caibx"], "Pruning", "chunks deleted/s"),
])
def test_bars_are_labelled_and_count(inputs: Path, tmp_path: Path, command: list[str], label: str, unit: str):
    """The bar (a terminal, or DESYNC_PROGRESSBAR_ENABLED): every long command labelled, counting
    bytes or chunks with a rate; known totals end at 100%."""
    if command[0] != "make" and command[0] != "tar":
        assert run_in(tmp_path, inputs, STORE[0]).returncode == 0
    r = run_in(tmp_path, inputs, command, env={"DESYNC_PROGRESSBAR_ENABLED": "1", "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    frames = [f for f in re.split(r"[\r\n]", r.stderr) if f.strip()]
    assert frames and all(f.startswith(label + ":") for f in frames), frames
    last = frames[-1]
    assert unit in last and len(last) <= 100, last
    if command[0] in ("make", "extract", "cache"):
        assert "100%" in last, last
