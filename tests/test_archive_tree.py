"""A generated tree with every corner of the catar format (tests/treegen.py), against casync.

* `pydesync tar` is byte-identical to `casync make` (default features — as
  root the full set — and the portable set), for the .catar and the .caidx;
* `casync extract` of our archive restores a tree whose `casync mtree` and
  `casync digest` equal the source's;
* our `mtree` of the directory, of the .catar and of the .caidx are identical
  and agree with `casync mtree` on every keyword both print;
* our `digest` equals casync's for the directory, the .catar and the .caidx;
* the casync vectors: `tar` of the regenerated tree-portable / tree-full
  reproduces tree-portable.catar / tree-full.catar (+ .caidx) byte for byte.

casync limits (see treegen.py): it cannot pack more than 63 path components
and cannot extract non-directories with names over 237 bytes, so the tree
compared with casync has 61 levels of nesting, the one casync extracts has
237-byte file names, and the 100-level tree is checked with pydesync alone
(plus casync's refusal).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need
from procutil import HANG_GUARD
from treegen import CASYNC_MAX_DEPTH, CASYNC_MAX_EXTRACT_NAME, PORTABLE, build_tree, count_entries

FEATURES = {"default": [], "portable": PORTABLE}
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    out = {"deep": base / "deep", "casync": base / "casync", "extractable": base / "extractable"}
    build_tree(out["deep"], depth=100)
    build_tree(out["casync"], depth=CASYNC_MAX_DEPTH)
    build_tree(out["extractable"], depth=CASYNC_MAX_DEPTH, long_name=CASYNC_MAX_EXTRACT_NAME)
    return out


def casync_run(casync: str, *args: str | os.PathLike[str]) -> bytes:
    proc = subprocess.run([casync, *map(str, args)], capture_output=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def with_args(features: list[str]) -> list[str]:
    return [f"--with={f}" for f in features]


def ok(result) -> bytes:  # type: ignore[no-untyped-def]
    assert result.returncode == 0, result.stderr
    return result.stdout


def parse_mtree(text: str) -> dict[str, dict[str, str]]:
    entries = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, *keywords = line.split(" ")
            entries[name] = dict(k.split("=", 1) for k in keywords)
    return entries


# ---- tar == casync make ------------------------------------------------------------------------
@pytest.mark.parametrize("features", FEATURES)
def test_tar_byte_identical_to_casync_make(casync, cli, trees, tmp_path, features):
    tree, flags = trees["casync"], with_args(FEATURES[features])
    casync_run(casync, "make", *flags, tmp_path / "casync.catar", tree)
    casync_run(casync, "make", *flags, f"--store={tmp_path / 'casync.castr'}", tmp_path / "casync.caidx",
               tree)
    ok(cli("tar", *flags, tmp_path / "ours.catar", tree))
    ok(cli("tar", *flags, "-i", "-s", tmp_path / "ours.castr", tmp_path / "ours.caidx", tree))
    ours = (tmp_path / "ours.catar").read_bytes()
    assert ours == (tmp_path / "casync.catar").read_bytes()
    assert (tmp_path / "ours.caidx").read_bytes() == (tmp_path / "casync.caidx").read_bytes()
    # Hard links are three full copies; the sparse files are stored with all their zeros.
    assert ours.count(hashlib.sha256(b"hard").digest() * 300) == 3
    assert len(ours) > (7 << 20)


@pytest.mark.parametrize("features", FEATURES)
def test_casync_extracts_our_archive_to_an_equal_tree(casync, cli, trees, tmp_path, features):
    tree, flags = trees["extractable"], with_args(FEATURES[features])
    ok(cli("tar", *flags, tmp_path / "ours.catar", tree))
    casync_run(casync, "extract", *flags, tmp_path / "ours.catar", tmp_path / "restored")
    restored = tmp_path / "restored"
    assert casync_run(casync, "mtree", *flags, restored) == casync_run(casync, "mtree", *flags, tree)
    assert casync_run(casync, "digest", *flags, restored) == casync_run(casync, "digest", *flags, tree)
    assert (restored / "sparse").read_bytes()[3 << 20:(3 << 20) + 28] == b"data in the middle of a hole"


# ---- mtree ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", FEATURES)
def test_mtree_of_directory_catar_and_caidx_identical(cli, trees, tmp_path, features):
    tree, flags = trees["deep"], with_args(FEATURES[features])
    ok(cli("tar", *flags, tmp_path / "t.catar", tree))
    ok(cli("tar", *flags, "-i", "-s", tmp_path / "t.castr", tmp_path / "t.caidx", tree))
    of_dir = ok(cli("mtree", *flags, tree)).decode()
    assert ok(cli("mtree", tmp_path / "t.catar")).decode() == of_dir
    assert ok(cli("mtree", "-i", "-s", tmp_path / "t.castr", tmp_path / "t.caidx")).decode() == of_dir

    lines = of_dir.splitlines()
    assert lines[0] == "#mtree v1.0"
    entries = parse_mtree(of_dir)
    assert len(entries) == len(lines) - 1
    if features == "default":
        assert len(entries) == count_entries(tree)
    bottom = "deep/" + "/".join(f"{i:02d}" for i in range(100)) + "/bottom"
    assert entries[bottom]["size"] == str(len(b"100 levels down\n"))
    for name in ("hard/orig", "hard/link1", "hardlink-at-root"):
        assert entries[name]["size"] == "9600"
    assert len({entries[n]["sha512256digest"] for n in ("hard/orig", "hard/link1", "hardlink-at-root")}) == 1
    assert entries["sparse"]["size"] == str(6 << 20)
    assert entries["empty"]["time"] == "0.000000000"
    assert entries["setuid"]["mode"] == "4755" and entries["sticky-dir"]["mode"] == "1777"
    assert entries["setgid-dir"] == {**entries["setgid-dir"], "type": "dir", "mode": "2775"}
    assert entries["fifo"]["type"] == "fifo" and entries["sym-loop"]["target"] == "sym-loop"
    assert "names/sp\\040ace" in entries and "names/latin1-\\351\\377" in entries
    assert "names/tab\\011and\\012newline" in entries and "names/hash\\043tag" in entries
    assert "names/" + "n" * 255 in entries


@pytest.mark.parametrize("features", FEATURES)
def test_mtree_agrees_with_casync_mtree(casync, cli, trees, features):
    tree, flags = trees["casync"], with_args(FEATURES[features])
    theirs = parse_mtree(casync_run(casync, "mtree", *flags, tree).decode())
    ours = parse_mtree(ok(cli("mtree", *flags, tree)).decode())
    assert ours.keys() == theirs.keys()
    compared = 0
    for name, keywords in theirs.items():
        keywords = dict(keywords)
        if "link" in keywords:
            keywords["target"] = keywords.pop("link")
        for key in keywords.keys() & ours[name].keys():
            assert ours[name][key] == keywords[key], (name, key)
            compared += 1
    assert compared >= 3 * len(theirs)  # type, mode, time at least


# ---- digest --------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", FEATURES)
def test_digest_matches_casync(casync, cli, trees, tmp_path, features):
    tree, flags = trees["casync"], with_args(FEATURES[features])
    expected = casync_run(casync, "digest", *flags, tree).decode().strip()
    ok(cli("tar", *flags, tmp_path / "t.catar", tree))
    ok(cli("tar", *flags, "-i", "-s", tmp_path / "t.castr", tmp_path / "t.caidx", tree))
    assert ok(cli("digest", *flags, tree)).decode().strip() == expected
    assert ok(cli("digest", tmp_path / "t.catar")).decode().strip() == expected
    assert ok(cli("digest", "-s", tmp_path / "t.castr", tmp_path / "t.caidx")).decode().strip() == expected
    assert hashlib.new("sha512_256", (tmp_path / "t.catar").read_bytes()).hexdigest() == expected


def test_deep_tree_beyond_casync_limit(casync, cli, trees, tmp_path):
    """casync refuses more than 63 path components; pydesync packs and reads 100 levels."""
    tree = trees["deep"]
    proc = subprocess.run([casync, "make", tmp_path / "c.catar", tree], capture_output=True)
    assert proc.returncode != 0 and b"Argument list too long" in proc.stderr
    ok(cli("tar", tmp_path / "t.catar", tree))
    expected = hashlib.new("sha512_256", (tmp_path / "t.catar").read_bytes()).hexdigest()
    assert ok(cli("digest", tree)).decode().strip() == expected
    assert ok(cli("digest", tmp_path / "t.catar")).decode().strip() == expected


# ---- the casync vectors --------------------------------------------------------------------------
@pytest.mark.parametrize("vector", ["tree-portable", "tree-full"])
def test_tar_reproduces_casync_vector(cli, casync_data, tmp_path, vector):
    full = vector == "tree-full"
    if full:
        need(ROOT, "tree-full needs root (chown, mknod, ACLs, chattr, file capabilities)")
    tree = tmp_path / vector
    subprocess.run([sys.executable, str(casync_data / "gen.py"), "tree", str(tree),
                    *(["--full"] if full else [])], check=True)
    flags = [] if full else with_args(PORTABLE)
    ok(cli("tar", *flags, tmp_path / "t.catar", tree))
    ok(cli("tar", *flags, "-i", "-s", tmp_path / "t.castr", tmp_path / "t.caidx", tree))
    need((casync_data / f"{vector}.catar").is_file(), f"{vector}.catar missing")
    assert (tmp_path / "t.catar").read_bytes() == (casync_data / f"{vector}.catar").read_bytes()
    assert (tmp_path / "t.caidx").read_bytes() == (casync_data / f"{vector}.caidx").read_bytes()
    # and the three mtree inputs agree for the vectors too
    of_dir = ok(cli("mtree", *flags, tree))
    assert ok(cli("mtree", casync_data / f"{vector}.catar")) == of_dir
    from_index = cli("mtree", "-i", "-s", casync_data / f"{vector}.castr", casync_data / f"{vector}.caidx")
    assert ok(from_index) == of_dir
