"""What a desync user does, and what must not go wrong for them: a desync config file read against a
schema (no string ever turns a check off), durations as desync and Go write them, unreachable
stores reported, outputs written atomically, arguments in the wrong order refused, one rule for
creating stores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean_error, no_stray_files, run_cli

from pydesync.index import read_index


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """A 2 MiB blob in a local store, with its index."""
    (tmp_path / "blob").write_bytes(random.Random(5).randbytes(2 << 20))
    r = run_cli("make", "-s", tmp_path / "store", tmp_path / "blob.caibx", tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    return tmp_path


def config(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    return path


def corrupt_one_chunk(store: Path, index: Path) -> str:
    chunk = str(read_index(str(index)).chunks[0].id)
    path = store / chunk[:4] / f"{chunk}.cacnk"
    path.write_bytes(path.read_bytes()[:-8] + bytes(8))
    return chunk


# ---- the config file -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "expected"), [
    ("skip-verify", "false", "expected true or false"),
    ("trust-insecure", "false", "expected true or false"),
    ("uncompressed", 1, "expected true or false"),
    ("error-retry", "3", "expected a whole number"),
    ("error-retry", -5, "expected a whole number (0 or more)"),
    ("error-retry", True, "expected a whole number"),
    ("http-auth", 5, "expected a string"),
    ("n", "x", "expected a whole number"),
    ("timeout", "60 s", "expected a duration"),
    ("timeout", 1.5, "expected a duration"),
    ("encryption-algorithm", "rot13", 'expected "aes-256-gcm" or "xchacha20-poly1305"'),
])
def test_a_config_value_of_the_wrong_type_is_one_error(made: Path, key: str, value: object, expected: str):
    """`"skip-verify": "false"` once turned verification off; now every wrong type stops the
    command before it reads anything, naming the file, the entry, the key and what it expects."""
    corrupt_one_chunk(made / "store", made / "blob.caibx")
    path = config(made, {"store-options": {str(made / "store"): {key: value}}})
    r = run_cli("--config", path, "extract", "-s", made / "store", made / "blob.caibx", made / "out")
    assert_clean_error(r, f"config file {path}", f'"{made / "store"}"', key, expected, json.dumps(value))
    assert not (made / "out").exists()


def test_a_string_false_never_turns_verification_off(made: Path):
    """The case that was found: with the corrupt chunk, extract must fail whatever the config says."""
    chunk = corrupt_one_chunk(made / "store", made / "blob.caibx")
    for options in ({"skip-verify": False}, {}):
        path = config(made, {"store-options": {str(made / "store"): options}})
        r = run_cli("--config", path, "extract", "-s", made / "store", made / "blob.caibx", made / "out")
        assert_clean_error(r, chunk)
        assert not (made / "out").exists()


def test_go_durations_and_nanoseconds_both_work(made: Path):
    for timeout, base in (("60s", "500ms"), (60_000_000_000, 500_000_000), ("1m30s", "0")):
        path = config(made, {"store-options": {str(made / "store"): {
            "timeout": timeout, "error-retry-base-interval": base}}})
        r = run_cli("--config", path, "extract", "-s", made / "store", made / "blob.caibx", made / "out")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert (made / "out").read_bytes() == (made / "blob").read_bytes()


def test_unknown_keys_are_warnings(made: Path):
    path = config(made, {"store-options": {str(made / "store"): {"skip-verfiy": True}}, "s3-creds": {}})
    r = run_cli("--config", path, "extract", "-s", made / "store", made / "blob.caibx", made / "out")
    assert r.returncode == 0
    assert r.stderr.splitlines() == [
        f"Warning: config file {path}: unknown key s3-creds (ignored)",
        f"Warning: config file {path}: unknown key store-options: {made / 'store'}: skip-verfiy (ignored)"]


@pytest.mark.parametrize("content", ["[1, 2]", '{"store-options": [1]}', '{"store-options": {"/x": 5}}',
                                     "{not json"])
def test_a_config_of_the_wrong_shape_is_one_error(made: Path, content: str):
    path = made / "config.json"
    path.write_text(content)
    assert_clean_error(run_cli("--config", path, "info", made / "blob.caibx"), str(path))


# ---- stores --------------------------------------------------------------------------------------------

def test_an_unreachable_store_is_an_error_not_an_empty_store(made: Path):
    r = run_cli("info", "-e", "1", "-s", "http://127.0.0.1:1/", made / "blob.caibx")
    assert_clean_error(r, "127.0.0.1:1")
    assert r.stdout == b""


@pytest.mark.parametrize("command", ["make", "tar-i", "chop", "cache"])
def test_a_missing_store_is_created_only_where_its_parent_exists(made: Path, command: str):
    deep, fresh = made / "no" / "such" / "store", made / "fresh"
    (made / "tree").mkdir()
    shutil.copy(made / "blob", made / "tree" / "blob")

    def run(store: Path):
        return {
            "make": lambda: run_cli("make", "-s", store, made / "new.caibx", made / "blob"),
            "tar-i": lambda: run_cli("tar", "-i", "-s", store, made / "new.caidx", made / "tree"),
            "chop": lambda: run_cli("chop", "-s", store, made / "blob.caibx", made / "blob"),
            "cache": lambda: run_cli("cache", "-s", made / "store", "-c", store, made / "blob.caibx"),
        }[command]()

    assert_clean_error(run(deep), str(deep), "does not exist")
    assert not (made / "no").exists()
    r = run(fresh)
    assert r.returncode == 0, r.stderr
    assert any(fresh.glob("*/*.cacnk"))


# ---- outputs and arguments -----------------------------------------------------------------------------

def test_cat_writes_its_output_atomically(made: Path):
    """A chunk that fails to verify: the old output stays as it was, and no temporary file is left."""
    chunk = corrupt_one_chunk(made / "store", made / "blob.caibx")
    out = made / "out" / "image"
    out.parent.mkdir()
    out.write_bytes(b"the old image")
    r = run_cli("cat", "-s", made / "store", made / "blob.caibx", out)
    assert_clean_error(r, chunk)
    assert out.read_bytes() == b"the old image"
    assert no_stray_files(out.parent, {"image"}) == []


def test_cat_into_a_missing_directory_says_it_cannot_write(made: Path):
    out = made / "nodir" / "out.img"
    r = run_cli("cat", "-s", made / "store", made / "blob.caibx", out)
    assert_clean_error(r, f"cannot write {out}: No such file or directory")


def test_make_with_its_arguments_swapped_does_not_overwrite_the_image(made: Path):
    image = made / "disk.img"
    image.write_bytes(random.Random(8).randbytes(1 << 20))
    before = image.read_bytes()
    r = run_cli("make", "-s", made / "s.castr", image, made / "blob.caibx")  # INDEX and FILE swapped
    assert_clean_error(r, f"{image} exists and is not an index", "INDEX FILE")
    assert image.read_bytes() == before
    assert not (made / "s.castr").exists()  # and no new, empty store either


def test_make_never_writes_an_index_over_its_input(made: Path):
    r = run_cli("make", "-s", made / "store", made / "blob", made / "blob")
    assert_clean_error(r, "input and output filenames match")
    assert (made / "blob").stat().st_size == 2 << 20


def test_make_over_an_existing_index_replaces_it(made: Path):
    r = run_cli("make", "-s", made / "store", made / "blob.caibx", made / "blob")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(made / "blob.caibx") > 48


# ---- extract to standard output ------------------------------------------------------------------------

def test_extract_to_dash_streams_the_blob_to_stdout_with_seeds(made: Path):
    """casync writes the blob to stdout for `-` (RAUC passes its own descriptor); desync writes a
    file named `-`. Here: the blob, in order, seeds used, statistics on stderr."""
    v2 = (made / "blob").read_bytes()[: 1 << 20] + random.Random(9).randbytes(300_000)
    (made / "v2").write_bytes(v2)
    assert run_cli("make", "-s", made / "store", made / "v2.caibx", made / "v2").returncode == 0
    r = run_cli("extract", "--print-stats", "-s", made / "store", "--seed", made / "blob.caibx",
                made / "v2.caibx", "-", cwd=made)
    assert r.returncode == 0, r.stderr
    assert r.stdout == v2
    stats = json.loads(r.stderr)
    assert stats["chunks-from-seeds"] > 0 and stats["chunks-from-store"] > 0
    assert not (made / "-").exists()


def test_extract_to_dash_never_writes_a_bad_chunk(made: Path):
    chunk = corrupt_one_chunk(made / "store", made / "blob.caibx")
    r = run_cli("extract", "-s", made / "store", made / "blob.caibx", "-")
    assert_clean_error(r, chunk)
    assert r.stdout == b""  # the corrupt chunk is the first one: nothing before it


def test_blob_reader_refuses_negative_offsets_and_lengths(made: Path):
    from pydesync import BlobReader, open_store

    reader = BlobReader(read_index(str(made / "blob.caibx")), open_store(str(made / "store")))
    blob = (made / "blob").read_bytes()
    assert reader.read(10, 5) == blob[10:15] and reader.read(10, 0) == b""
    for offset, length in ((-5, 10), (0, -1)):
        with pytest.raises(ValueError, match="negative"):
            reader.read(offset, length)


# ---- messages ------------------------------------------------------------------------------------------

def test_a_seed_whose_index_is_missing_says_so(made: Path):
    r = run_cli("extract", "-s", made / "store", "--seed", made / "nope.caibx", made / "blob.caibx",
                made / "o")
    assert_clean_error(r, f"index {made / 'nope.caibx'} does not exist")


def test_tar_of_a_missing_directory_says_it_does_not_exist(made: Path):
    assert_clean_error(run_cli("tar", made / "x.catar", made / "nonexistent"), "does not exist")


def test_a_store_location_without_a_host_is_refused(made: Path):
    r = run_cli("extract", "-s", "http://", made / "blob.caibx", made / "out")
    assert_clean_error(r, "invalid location 'http://': no host")


def test_an_encrypted_store_read_without_its_key_says_so(made: Path):
    key = "11" * 32
    path = config(made, {"store-options": {str(made / "enc"): {"encryption": True, "encryption-key": key}}})
    r = run_cli("--config", path, "make", "-s", made / "enc", made / "e.caibx", made / "blob")
    assert r.returncode == 0, r.stderr
    r = run_cli("extract", "-s", made / "enc", made / "e.caibx", made / "out")
    assert_clean_error(r, "missing", "encrypted chunk", "encryption options")


# ---- the command line itself ---------------------------------------------------------------------------

def test_version_help_and_usage_errors():
    from pydesync.cli.meta import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.out == f"pydesync {version()}\n"
    r = run_cli("help", "extract")
    assert r.returncode == 0 and r.out.startswith("usage: pydesync extract")
    r = run_cli("extrat", "a", "b")
    assert_clean_error(r, "unknown command 'extrat'", "did you mean 'extract'")
    assert r.returncode == 1
    r = run_cli("make", "--no-such-flag", "a", "b")
    assert_clean_error(r, "--no-such-flag", "see 'pydesync make -h'")
    assert r.returncode == 1
    assert run_cli().returncode == 1


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str):
    r = run_cli("completion", shell)
    assert r.returncode == 0 and "pydesync" in r.out and "_ARGCOMPLETE" in r.out


def test_completion_answers_the_shell(tmp_path: Path):
    """What the shell runs on TAB (argcomplete's protocol): the commands that start with `ext`."""
    env = {"_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": "pydesync ext", "COMP_POINT": "12",
           "_ARGCOMPLETE_SHELL": "bash", "_ARGCOMPLETE_STDOUT_FILENAME": str(tmp_path / "out")}
    run_cli(env=env)
    assert (tmp_path / "out").read_text().split() == ["extract"]


def test_manpage(tmp_path: Path):
    r = run_cli("manpage", tmp_path)
    assert r.returncode == 0
    page = (tmp_path / "pydesync.1").read_text().replace("\\-", "-")
    assert page.startswith(".TH PYDESYNC") and "chunk-server" in page and "--seed" in page


def test_verbose_logs_stores_tried_and_retries(made: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    r = run_cli("--verbose", "extract", "-s", tmp_path / "empty", "-s", made / "store", made / "blob.caibx",
                tmp_path / "out")
    assert r.returncode == 0
    assert "to fetch from" in r.stderr and "trying the next store" in r.stderr and "fetched" in r.stderr
    r = run_cli("extract", "--verbose", "-e", "2", "-b", "1ms", "-s", "http://127.0.0.1:1/",
                made / "blob.caibx", tmp_path / "out2")
    assert r.returncode == 1 and "attempt 1 of 2; retrying" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("Error: ")
