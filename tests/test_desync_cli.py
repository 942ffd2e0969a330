"""desync's CLI expectations (testdata/desync MANIFEST.md, cmd/desync/testdata), run as `python -m pydesync`.

Shared data is read in place; anything a command must modify is copied into tmp_path first.
desync's seed cases are in test_seeds.py, its server cases in test_http.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean_error, no_stray_files
from vectors import CHUNKER_TABLE, NULL_CHUNK_32K

from pydesync import ChunkId, LocalStore, parse_index

TREE_CHUNK = "0589328ff916d08f5fe59a9aa0731571448e91341f37ca5484a85b9f0af14de3"
BLOB1_CHUNK = "0b2a199263ffb2600b6f8be2e03b7439ffb0ad05a00b867f427a716e3e386c2d"
INVALID_ID = "1234567890" + "0" * 54
BLOB1_SHA256 = "eb2fb317e36a1296ee6018371ca621017634f4a4790e4990846126b251147fca"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ---- helpers -----------------------------------------------------------------------------------

def writable_copy(src: Path, dst: Path) -> Path:
    """Copy a (read-only) shared store into tmp_path with writable files and directories."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    os.chmod(dst, 0o755)
    for folder, dirs, files in os.walk(dst):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return dst


def store_ids(path: Path) -> set[str]:
    return {str(i) for i in LocalStore(path).ids()}


def index_ids(path: Path) -> set[str]:
    return {str(c.id) for c in parse_index(path.read_bytes())}


def without_flags(data: bytes) -> bytes:
    return data[:16] + bytes(8) + data[24:]


@pytest.fixture(scope="module")
def blob1(desync_data: Path) -> bytes:
    data = (desync_data / "cmd" / "desync" / "testdata" / "blob1").read_bytes()
    assert hashlib.sha256(data).hexdigest() == BLOB1_SHA256
    return data


@pytest.fixture
def d(desync_cmd: Path) -> Path:
    """Short alias for cmd/desync/testdata."""
    return desync_cmd


# ---- make ----------------------------------------------------------------------------------------

def test_make_extract_roundtrip(cli, d: Path, blob1: bytes, tmp_path: Path):
    store = tmp_path / "new.store"
    index = tmp_path / "blob1.caibx"
    r = cli("make", "-m", "2:8:32", "-s", store, index, d / "blob1")
    assert r.returncode == 0, r.stderr
    expected = (d / "blob1.caibx").read_bytes()
    got = index.read_bytes()
    assert without_flags(got) == without_flags(expected)
    assert int.from_bytes(got[16:24], "little") == 0xB000000000000000  # casync's flags; desync: 0xa000...
    assert store_ids(store) == index_ids(d / "blob1.caibx")
    out = tmp_path / "out"
    r = cli("extract", "-s", store, index, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    assert no_stray_files(tmp_path, {"new.store", "blob1.caibx", "out"}) == []


def test_make_index_to_stdout_without_store(cli, d: Path):
    r = cli("make", "-m", "2:8:32", "-", d / "blob1")
    assert r.returncode == 0, r.stderr
    assert without_flags(r.stdout) == without_flags((d / "blob1.caibx").read_bytes())


def test_make_print_stats(cli, d: Path, tmp_path: Path):
    r = cli("make", "-m", "2:8:32", "--print-stats", tmp_path / "x.caibx", d / "blob1")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr)
    assert list(stats) == ["ChunksAccepted", "ChunksProduced"]
    n = stats["ChunksProduced"]  # laid out as desync's printJSON (indented by two spaces)
    assert r.stderr == f'{{\n  "ChunksAccepted": {n},\n  "ChunksProduced": {n}\n}}\n'
    assert n == len(parse_index((tmp_path / "x.caibx").read_bytes()).chunks)


# ---- extract -------------------------------------------------------------------------------------

def test_extract_new_file(cli, d: Path, blob1: bytes, tmp_path: Path):
    out = tmp_path / "blob1"
    r = cli("extract", "--store", d / "blob1.store", d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    assert no_stray_files(tmp_path, {"blob1"}) == []


def test_extract_over_existing_small_file(cli, d: Path, blob1: bytes, tmp_path: Path):
    out = tmp_path / "blob1"
    out.write_bytes(b"\x01\x02\x03\x04")
    r = cli("extract", "-s", d / "blob1.store", d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    assert no_stray_files(tmp_path, {"blob1"}) == []


def test_extract_in_place_needs_no_chunks(cli, d: Path, blob1: bytes, tmp_path: Path):
    out = tmp_path / "blob1"
    out.write_bytes(blob1)
    assert store_ids(d / "empty.store") == set()
    r = cli("extract", "-k", "-s", d / "empty.store", d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    r = cli("extract", "--in-place", "--print-stats", "-s", d / "empty.store", d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks-from-store"] == 0


def test_extract_from_empty_store_fails_cleanly(cli, d: Path, tmp_path: Path):
    out = tmp_path / "blob1"
    r = cli("extract", "-s", d / "empty.store", d / "blob1.caibx", out)
    assert_clean_error(r)
    assert not out.exists()
    assert no_stray_files(tmp_path, set()) == []


def test_extract_with_new_cache(cli, d: Path, blob1: bytes, tmp_path: Path):
    cache = tmp_path / "cache"
    out = tmp_path / "out" / "blob1"
    out.parent.mkdir()
    r = cli("extract", "-s", d / "blob1.store", "-c", cache, d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    cached = store_ids(cache)
    wanted = index_ids(d / "blob1.caibx")
    # The all-zero null chunk never needs fetching; every other chunk lands in the cache.
    assert wanted - {NULL_CHUNK_32K} <= cached <= wanted
    # A second run is served from the cache alone.
    out.unlink()
    r = cli("extract", "-s", d / "empty.store", "-c", cache, d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1


@pytest.mark.parametrize("extra", [[], ["-n", "1"], ["cache"], ["cache", "-n", "1"]],
                         ids=["plain", "n1", "cache", "cache-n1"])
def test_extract_falls_through_stores(cli, d: Path, blob1: bytes, tmp_path: Path, extra: list[str]):
    """blob2.store lacks 7 of blob1's chunks: they must come from blob1.store."""
    args = ["extract", "-s", d / "blob2.store", "-s", d / "blob1.store"]
    if extra[:1] == ["cache"]:
        args += ["-c", tmp_path / "cache"]
        extra = extra[1:]
    out = tmp_path / "blob1"
    r = cli(*args, *extra, d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    if (tmp_path / "cache").exists():
        assert store_ids(tmp_path / "cache") <= index_ids(d / "blob1.caibx")


def test_extract_store_list_with_comma(cli, d: Path, blob1: bytes, tmp_path: Path):
    out = tmp_path / "blob1"
    r = cli("extract", "-s", f"{d / 'blob2.store'},{d / 'blob1.store'}", d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1


def test_extract_single_store_missing_chunks_fails(cli, d: Path, tmp_path: Path):
    out = tmp_path / "blob1"
    r = cli("extract", "-s", d / "blob2.store", d / "blob1.caibx", out)
    assert_clean_error(r, "missing")
    assert no_stray_files(tmp_path, set()) == []


def test_extract_needs_a_store(cli, d: Path, tmp_path: Path):
    r = cli("extract", d / "blob1.caibx", tmp_path / "out")
    assert_clean_error(r, "no store provided")


def test_extract_input_output_match(cli, d: Path, tmp_path: Path):
    idx = tmp_path / "x.caibx"
    shutil.copyfile(d / "blob1.caibx", idx)
    r = cli("extract", "-s", d / "blob1.store", idx, idx)
    assert_clean_error(r, "input and output filenames match")
    assert idx.read_bytes() == (d / "blob1.caibx").read_bytes()


def test_extract_tree_caidx(cli, d: Path, tmp_path: Path):
    out = tmp_path / "tree.catar"
    r = cli("extract", "-s", d / "tree.store", d / "tree.caidx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (d / "tree.catar").read_bytes()


# ---- cache repair ----------------------------------------------------------------------------------

@pytest.fixture
def bad_cache(d: Path, tmp_path: Path) -> Path:
    """A cache whose 0589…de3 chunk file holds the bytes of blob1.store's 0b2a…2c chunk."""
    cache = tmp_path / "cache"
    (cache / TREE_CHUNK[:4]).mkdir(parents=True)
    shutil.copyfile(d / "blob1.store" / BLOB1_CHUNK[:4] / f"{BLOB1_CHUNK}.cacnk",
                    cache / TREE_CHUNK[:4] / f"{TREE_CHUNK}.cacnk")
    return cache


@pytest.mark.parametrize("command", ["cat", "extract"])
def test_cache_repair_false_fails(cli, d: Path, bad_cache: Path, tmp_path: Path, command: str):
    out = tmp_path / "tree.catar"
    r = cli(command, "-s", d / "tree.store", "-c", bad_cache, "--cache-repair=false", d / "tree.caidx", out)
    assert_clean_error(r, f"chunk id {TREE_CHUNK} does not match its hash {BLOB1_CHUNK}")
    assert not out.exists() or command == "cat"
    # Nothing was repaired.
    cached = (bad_cache / TREE_CHUNK[:4] / f"{TREE_CHUNK}.cacnk").read_bytes()
    assert cached == (d / "blob1.store" / BLOB1_CHUNK[:4] / f"{BLOB1_CHUNK}.cacnk").read_bytes()


@pytest.mark.parametrize("flags", [[], ["--cache-repair=true"], ["-r"]], ids=["default", "true", "short"])
@pytest.mark.parametrize("command", ["cat", "extract"])
def test_cache_repair_default_repairs(cli, d: Path, bad_cache: Path, tmp_path: Path, command: str,
                                      flags: list[str]):
    out = tmp_path / "tree.catar"
    r = cli(command, "-s", d / "tree.store", "-c", bad_cache, *flags, d / "tree.caidx", out)
    assert r.returncode == 0, r.stderr
    catar = (d / "tree.catar").read_bytes()
    assert out.read_bytes() == catar
    assert LocalStore(bad_cache).get(ChunkId(TREE_CHUNK)) == catar
    # Now valid even without repair.
    r = cli("cat", "-s", d / "empty.store", "-c", bad_cache, "--cache-repair=false", d / "tree.caidx")
    assert r.returncode == 0, r.stderr
    assert r.stdout == catar


# ---- cat ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,lo,hi", [([], 0, None), (["-o", "1024"], 1024, None),
                                        (["-o", "1024", "-l", "2048"], 1024, 3072),
                                        (["--offset", "2000000", "--length", "100000"], 2000000, 2100000)])
def test_cat(cli, d: Path, blob1: bytes, args: list[str], lo: int, hi: int | None):
    r = cli("cat", "-s", d / "blob1.store", *args, d / "blob1.caibx")
    assert r.returncode == 0, r.stderr
    assert r.stdout == blob1[lo:hi]


def test_cat_to_file(cli, d: Path, blob1: bytes, tmp_path: Path):
    out = tmp_path / "part"
    out.write_bytes(b"x" * 10000)  # truncated, not overwritten in place
    r = cli("cat", "-s", d / "blob1.store", "-o", "1024", "-l", "2048", d / "blob1.caibx", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1[1024:3072]


def test_cat_needs_a_store(cli, d: Path):
    assert_clean_error(cli("cat", d / "blob1.caibx"), "no store provided")


# ---- chunk -------------------------------------------------------------------------------------------

def test_chunk_chunker_input(cli, desync_data: Path):
    r = cli("chunk", desync_data / "testdata" / "chunker.input")
    assert r.returncode == 0, r.stderr
    assert r.out.splitlines() == [f"{s}\t{n}\t{i}" for s, n, i in CHUNKER_TABLE]
    # Starting at a boundary reproduces the rest of the table, with absolute offsets.
    r = cli("chunk", "-m", "16:64:256", "-S", "81590", desync_data / "testdata" / "chunker.input")
    assert r.returncode == 0, r.stderr
    assert r.out.splitlines() == [f"{s}\t{n}\t{i}" for s, n, i in CHUNKER_TABLE[1:]]


def test_chunk_blob1_matches_index(cli, d: Path):
    r = cli("chunk", "-m", "2:8:32", d / "blob1")
    assert r.returncode == 0, r.stderr
    index = parse_index((d / "blob1.caibx").read_bytes())
    assert r.out.splitlines() == [f"{c.start}\t{c.size}\t{c.id}" for c in index]


# ---- chop --------------------------------------------------------------------------------------------

def test_chop(cli, d: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    r = cli("chop", "-s", store, d / "blob1.caibx", d / "blob1")
    assert r.returncode == 0, r.stderr
    assert store_ids(store) == index_ids(d / "blob1.caibx")
    for chunk_id in store_ids(store):
        LocalStore(store).get(ChunkId(chunk_id))  # decodes and verifies


def test_chop_ignore(cli, d: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    r = cli("chop", "-s", store, "--ignore", d / "blob2.caibx", d / "blob1.caibx", d / "blob1")
    assert r.returncode == 0, r.stderr
    assert store_ids(store) == index_ids(d / "blob1.caibx") - index_ids(d / "blob2.caibx")
    assert len(store_ids(store)) == 7


def test_chop_ignore_chunks(cli, d: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    ignore = sorted(index_ids(d / "blob1.caibx"))[:100]
    listing = tmp_path / "ignore.txt"
    listing.write_text("\n".join(ignore[:50]) + "\n\n" + "\n".join(ignore[50:]) + "\n")
    r = cli("chop", "-s", store, "--ignore-chunks", listing, d / "blob1.caibx", d / "blob1")
    assert r.returncode == 0, r.stderr
    assert store_ids(store) == index_ids(d / "blob1.caibx") - set(ignore)


def test_chop_without_store(cli, d: Path):
    assert_clean_error(cli("chop", d / "blob1.caibx", d / "blob1"), "store")


def test_chop_store_does_not_exist(cli, d: Path, tmp_path: Path):
    """desync refuses a missing store in chop (but creates one in make); pydesync has one rule for
    every writer: a missing store is created when its parent exists, else it is an error."""
    missing = tmp_path / "no-such-dir" / "store"
    r = cli("chop", "-s", missing, d / "blob1.caibx", d / "blob1")
    assert_clean_error(r, str(missing), "does not exist")
    assert not missing.parent.exists()
    r = cli("chop", "-s", tmp_path / "new-store", d / "blob1.caibx", d / "blob1")
    assert r.returncode == 0, r.stderr
    assert store_ids(tmp_path / "new-store") == index_ids(d / "blob1.caibx")


def test_chop_wrong_file(cli, d: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    r = cli("chop", "-s", store, d / "blob1.caibx", d / "blob2")
    assert_clean_error(r)


# ---- cache -------------------------------------------------------------------------------------------

def test_cache_one_index(cli, d: Path, tmp_path: Path):
    target = tmp_path / "cache"
    r = cli("cache", "-s", d / "blob1.store", d / "blob1.caibx", "-c", target)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted({i[:4] for i in index_ids(d / "blob1.caibx")})
    assert store_ids(target) == index_ids(d / "blob1.caibx")


def test_cache_two_stores_two_indexes(cli, d: Path, tmp_path: Path):
    target = tmp_path / "cache"
    r = cli("cache", "-s", d / "blob1.store", "-s", d / "blob2.store", d / "blob1.caibx", d / "blob2.caibx",
            "-c", target)
    assert r.returncode == 0, r.stderr
    assert store_ids(target) == index_ids(d / "blob1.caibx") | index_ids(d / "blob2.caibx")
    assert len(store_ids(target)) == 138


def test_cache_ignore(cli, d: Path, tmp_path: Path):
    target = tmp_path / "cache"
    r = cli("cache", "-s", d / "blob2.store", "--ignore", d / "blob1.caibx", d / "blob2.caibx", "-c", target)
    assert r.returncode == 0, r.stderr
    assert store_ids(target) == index_ids(d / "blob2.caibx") - index_ids(d / "blob1.caibx")


def test_cache_ignore_chunks(cli, d: Path, tmp_path: Path):
    target = tmp_path / "cache"
    skip = sorted(index_ids(d / "blob1.caibx"))[::2]
    listing = tmp_path / "skip.txt"
    listing.write_text("\n".join(skip) + "\n")
    r = cli("cache", "-s", d / "blob1.store", "--ignore-chunks", listing, d / "blob1.caibx", "-c", target)
    assert r.returncode == 0, r.stderr
    assert store_ids(target) == index_ids(d / "blob1.caibx") - set(skip)


def test_cache_errors(cli, d: Path, tmp_path: Path):
    r = cli("cache", "-s", d / "blob1.store", d / "blob1.caibx")
    assert_clean_error(r, "no target cache store provided")
    assert_clean_error(cli("cache", "-c", tmp_path / "c", d / "blob1.caibx"), "no source store provided")


# ---- prune -------------------------------------------------------------------------------------------

@pytest.fixture
def blob1_store_copy(d: Path, tmp_path: Path) -> Path:
    return writable_copy(d / "blob1.store", tmp_path / "blob1.store")


def test_prune_yes(cli, d: Path, blob1_store_copy: Path):
    r = cli("prune", "-s", blob1_store_copy, d / "blob2.caibx", "--yes")
    assert r.returncode == 0, r.stderr
    remaining = store_ids(blob1_store_copy)
    assert remaining == index_ids(d / "blob1.caibx") & index_ids(d / "blob2.caibx")
    assert len(remaining) == 124


def test_prune_y_keeps_referenced(cli, d: Path, blob1_store_copy: Path):
    r = cli("prune", "-y", "-s", blob1_store_copy, d / "blob1.caibx")
    assert r.returncode == 0, r.stderr
    assert store_ids(blob1_store_copy) == index_ids(d / "blob1.caibx")


def test_prune_prompt_no(cli, d: Path, blob1_store_copy: Path):
    r = cli("prune", "-s", blob1_store_copy, d / "blob2.caibx", input=b"n\n")
    assert r.returncode == 0, r.stderr
    assert "Warning: The provided index files reference 131 unique chunks" in r.out
    assert "[y/N]: " in r.out
    assert len(store_ids(blob1_store_copy)) == 131


def test_prune_prompt_yes(cli, d: Path, blob1_store_copy: Path):
    r = cli("prune", "-s", blob1_store_copy, d / "blob2.caibx", input=b"y\n")
    assert r.returncode == 0, r.stderr
    assert "[y/N]: " in r.out
    assert len(store_ids(blob1_store_copy)) == 124


# ---- verify ------------------------------------------------------------------------------------------

@pytest.fixture
def store_with_invalid(blob1_store_copy: Path) -> Path:
    bad = blob1_store_copy / "1234" / f"{INVALID_ID}.cacnk"
    bad.parent.mkdir()
    bad.write_bytes(b"invalid")
    return bad


def test_verify_reports_invalid_chunk(cli, blob1_store_copy: Path, store_with_invalid: Path):
    r = cli("verify", "-s", blob1_store_copy)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and INVALID_ID in lines[0]
    assert "removed" not in lines[0]
    assert store_with_invalid.exists()
    assert len(store_ids(blob1_store_copy)) == 132


def test_verify_repair_removes_invalid_chunk(cli, blob1_store_copy: Path, store_with_invalid: Path):
    r = cli("verify", "-s", blob1_store_copy, "-r")
    assert r.returncode == 0, r.stderr
    assert INVALID_ID in r.stderr and "removed" in r.stderr
    assert not store_with_invalid.exists()
    assert len(store_ids(blob1_store_copy)) == 131
    r = cli("verify", "-s", blob1_store_copy, "--repair", "-n", "1")
    assert r.returncode == 0 and r.stderr.strip() == ""


def test_verify_clean_store(cli, d: Path):
    r = cli("verify", "-s", d / "blob2.store")
    assert r.returncode == 0 and r.stderr.strip() == ""


# ---- verify-index ------------------------------------------------------------------------------------

@pytest.mark.parametrize("index,blob", [("blob1.caibx", "blob1"), ("blob2.caibx", "blob2")])
def test_verify_index_ok(cli, d: Path, index: str, blob: str):
    r = cli("verify-index", d / index, d / blob)
    assert r.returncode == 0, r.stderr


def test_verify_index_mismatch(cli, d: Path):
    assert_clean_error(cli("verify-index", d / "blob2.caibx", d / "blob1"))


def test_verify_index_wrong_size(cli, d: Path):
    assert_clean_error(cli("verify-index", d / "blob2.caibx", d / "blob2_corrupted"))


# ---- list-chunks -------------------------------------------------------------------------------------

def test_list_chunks(cli, d: Path):
    r = cli("list-chunks", d / "blob1.caibx")
    assert r.returncode == 0, r.stderr
    lines = r.out.splitlines()
    assert len(lines) == 161
    assert all(HEX64.match(line) for line in lines)
    assert lines == [str(c.id) for c in parse_index((d / "blob1.caibx").read_bytes())]


def test_list_chunks_stdin(cli, d: Path):
    r = cli("list-chunks", "-", input=(d / "blob1.caibx").read_bytes())
    assert r.returncode == 0, r.stderr
    assert len(r.out.splitlines()) == 161


# ---- info --------------------------------------------------------------------------------------------

INFO_ROWS = [
    # (args, in-seed, in-cache, not-in-seed-nor-cache, dedup-not-in-seed, …-nor-cache, …-compressed)
    (["-s", "blob1.store", "blob1.caibx"], 0, 0, 131, 1114112, 1114112, 0),
    (["-s", "blob1.store", "--seed", "blob2.caibx", "blob1.caibx"], 124, 0, 7, 80029, 80029, 0),
    (["-s", "blob2.store", "--seed", "blob1.caibx", "--cache", "blob2.cache", "--chunks-info",
      "blob2_chunks_info.json", "blob2.caibx"], 124, 25, 7, 80029, 80029, 76000),
    (["-s", "blob2.store", "--cache", "blob2.cache", "--chunks-info", "blob2_chunks_info.json",
      "blob2.caibx"], 0, 25, 106, 1114112, 853943, 818145),
    (["-s", "blob2.store", "--chunks-info", "blob2_chunks_info_missing.json", "blob2.caibx"],
     0, 0, 131, 1114112, 1114112, 0),
]


@pytest.mark.parametrize("row", INFO_ROWS, ids=[f"row{i}" for i in range(1, 6)])
def test_info(cli, d: Path, row):
    args, in_seed, in_cache, neither, not_in_seed, not_either, compressed = row
    r = cli("info", *args, cwd=d)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "total": 161, "unique": 131, "in-store": 131, "in-seed": in_seed, "in-cache": in_cache,
        "not-in-seed-nor-cache": neither, "size": 2097152, "dedup-size-not-in-seed": not_in_seed,
        "dedup-size-not-in-seed-nor-cache": not_either,
        "dedup-size-not-in-seed-nor-cache-compressed": compressed,
        "chunk-size-min": 2048, "chunk-size-avg": 8192, "chunk-size-max": 32768,
    }
    assert list(json.loads(r.stdout)) == [
        "total", "unique", "in-store", "in-seed", "in-cache", "not-in-seed-nor-cache", "size",
        "dedup-size-not-in-seed", "dedup-size-not-in-seed-nor-cache",
        "dedup-size-not-in-seed-nor-cache-compressed", "chunk-size-min", "chunk-size-avg", "chunk-size-max"]


def test_info_store_list_with_comma(cli, d: Path):
    r = cli("info", "-s", "empty.store,blob2.store", "blob1.caibx", cwd=d)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["in-store"] == 124


def test_info_without_store(cli, d: Path):
    r = cli("info", d / "blob1.caibx")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["total"], info["unique"], info["in-store"]) == (161, 131, 0)


def test_info_plain(cli, d: Path):
    r = cli("info", "-f", "plain", "-s", "blob1.store", "--seed", "blob2.caibx", "blob1.caibx", cwd=d)
    assert r.returncode == 0, r.stderr
    expected = [
        "Blob size: 2097152",
        "Size of deduplicated chunks not in seed: 80029",
        "Size of deduplicated chunks not in seed nor cache: 80029",
        "Total chunks: 161",
        "Unique chunks: 131",
        "Chunks in store: 131",
        "Chunks in seed: 124",
        "Chunks in cache: 0",
        "Chunks not in seed nor cache: 7",
        "Compressed chunks not in seed nor cache: 0",
        "Chunk size min: 2048",
        "Chunk size avg: 8192",
        "Chunk size max: 32768",
    ]
    assert r.out.splitlines() == expected  # desync's lines, in its order (cmd/desync/info.go)


# ---- inspect-chunks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("store,expected", [("blob2.store", "blob2_chunks_info.json"),
                                            ("blob2.cache", "blob2_chunks_info_missing.json"),
                                            (None, "blob2_chunks_info_no_store.json")])
def test_inspect_chunks(cli, d: Path, store: str | None, expected: str):
    args = ["-s", d / store] if store else []
    r = cli("inspect-chunks", *args, d / "blob2.caibx")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((d / expected).read_text())


def test_inspect_chunks_to_file(cli, d: Path, tmp_path: Path):
    out = tmp_path / "info.json"
    r = cli("inspect-chunks", "-s", d / "blob2.store", d / "blob2.caibx", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    assert json.loads(out.read_text()) == json.loads((d / "blob2_chunks_info.json").read_text())


def test_inspect_chunks_feeds_info(cli, d: Path, tmp_path: Path):
    out = tmp_path / "info.json"
    assert cli("inspect-chunks", "-s", d / "blob2.store", d / "blob2.caibx", out).returncode == 0
    r = cli("info", "-s", d / "blob2.store", "--cache", d / "blob2.cache", "--chunks-info", out,
            d / "blob2.caibx")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dedup-size-not-in-seed-nor-cache-compressed"] == 818145


# ---- --digest ----------------------------------------------------------------------------------------

def test_digest_invalid_is_rejected(cli, d: Path):
    for args in (["--digest", "md5", "list-chunks", d / "blob1.caibx"],
                 ["list-chunks", "--digest", "sha1", d / "blob1.caibx"],
                 ["--digest=bogus", "chunk", d / "blob1"]):
        assert_clean_error(cli(*args), "invalid digest algorithm")


def test_digest_mismatch_with_index_is_rejected(cli, d: Path, tmp_path: Path):
    """desync refuses an index whose SHA512-256 flag disagrees with --digest."""
    r = cli("--digest", "sha256", "list-chunks", d / "blob1.caibx")
    assert_clean_error(r, "index file uses SHA512-256")
    r = cli("extract", "--digest", "sha256", "-s", d / "blob1.store", d / "blob1.caibx", tmp_path / "out")
    assert_clean_error(r, "index file uses SHA512-256")
    assert no_stray_files(tmp_path, set()) == []


def test_digest_sha256_roundtrip(cli, d: Path, blob1: bytes, tmp_path: Path):
    store = tmp_path / "store"
    index = tmp_path / "blob1.caibx"
    r = cli("make", "--digest", "sha256", "-m", "2:8:32", "-s", store, index, d / "blob1")
    assert r.returncode == 0, r.stderr
    got = parse_index(index.read_bytes())
    assert got.flags & 0x2000000000000000 == 0
    reference = parse_index((d / "blob1.caibx").read_bytes())
    assert [(c.start, c.size) for c in got] == [(c.start, c.size) for c in reference]
    assert [str(c.id) for c in got] == [hashlib.sha256(blob1[c.start:c.end]).hexdigest() for c in got]
    assert store_ids(store) == {str(c.id) for c in got}
    # The index's flag selects the digest (as in casync); only a conflicting explicit --digest fails.
    r = cli("list-chunks", index)
    assert r.returncode == 0 and len(r.out.splitlines()) == len(got)
    assert_clean_error(cli("--digest", "sha512-256", "list-chunks", index), "index file uses SHA256")
    plain = tmp_path / "plain"
    assert cli("extract", "-s", store, index, plain).returncode == 0
    assert plain.read_bytes() == blob1
    out = tmp_path / "out"
    r = cli("--digest", "sha256", "extract", "-s", store, index, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob1
    r = cli("--digest", "sha256", "verify-index", index, d / "blob1")
    assert r.returncode == 0, r.stderr


def test_digest_sha256_chunk(cli, d: Path, blob1: bytes):
    r = cli("chunk", "--digest", "sha256", "-m", "2:8:32", d / "blob1")
    assert r.returncode == 0, r.stderr
    reference = parse_index((d / "blob1.caibx").read_bytes())
    assert r.out.splitlines() == [
        f"{c.start}\t{c.size}\t{hashlib.sha256(blob1[c.start:c.end]).hexdigest()}" for c in reference]
