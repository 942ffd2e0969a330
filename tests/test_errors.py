"""Bad input: one clear `Error: ...` line on stderr, non-zero exit, no traceback, nothing left behind.

Every case runs the real CLI in a subprocess. Outputs go to a folder of their
own so that a leftover temporary or partial file shows up in no_stray_files.
(Tests run as root in CI: nothing here relies on permissions.)
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest
from conftest import assert_clean_error, no_stray_files, run_cli

from pydesync.index import parse_index

HEADER = 48
TABLE_START = 64
ITEM = 40


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 600 KB random file, its index and a store, made once (read-only for the tests)."""
    folder = tmp_path_factory.mktemp("errors-blob")
    src = folder / "in.bin"
    src.write_bytes(random.Random(11).randbytes(600_000))
    store, index = folder / "store", folder / "in.caibx"
    r = run_cli("make", "-s", store, index, src)
    assert r.returncode == 0, r.stderr
    assert len(parse_index(index.read_bytes())) >= 3
    return {"src": src, "store": store, "index": index}


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def copy_store(store: Path, dest: Path) -> Path:
    for f in store.rglob("*"):
        target = dest / f.relative_to(store)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    return dest


def chunk_file(store: Path, chunk_id: str) -> Path:
    return store / chunk_id[:4] / f"{chunk_id}.cacnk"


def extract_fails(cli, index: Path, store: Path, outdir: Path, *fragments: str) -> None:
    """extract must fail cleanly, naming `fragments`, and leave nothing in outdir."""
    r = cli("extract", "-s", store, index, outdir / "blob")
    assert_clean_error(r, *fragments)
    assert no_stray_files(outdir, set()) == []


# ---- truncated indexes -----------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [
    pytest.param(lambda n: TABLE_START + ITEM + 17, id="mid-table-item"),
    pytest.param(lambda n: TABLE_START + 2 * ITEM, id="mid-table-item-boundary"),
    pytest.param(lambda n: n - 1, id="last-byte-of-tail"),
    pytest.param(lambda n: 30, id="in-header"),
    pytest.param(lambda n: HEADER + 8, id="in-table-header"),
    pytest.param(lambda n: 0, id="zero-length"),
])
def test_truncated_index(cli, blob, tmp_path, outdir, cut):
    data = blob["index"].read_bytes()
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(data[:cut(len(data))])
    extract_fails(cli, bad, blob["store"], outdir, str(bad), "invalid index")


# ---- corrupted indexes -----------------------------------------------------------------------------

def patched(data: bytes, offset: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<Q", b, offset, value)
    return bytes(b)


def end_offset(i: int) -> int:
    return TABLE_START + ITEM * i


CORRUPTIONS = {
    "bad-magic": lambda d: patched(d, 8, 0x1122334455667788),
    "bad-header-size": lambda d: patched(d, 0, 56),
    "bad-table-type": lambda d: patched(d, HEADER + 8, 0),
    "bad-tail-marker": lambda d: d[:-8] + struct.pack("<Q", 0x4B4F050E5549ECD2),
    "bad-tail-size": lambda d: patched(d, len(d) - 16, 12345),
    "unknown-flags": lambda d: patched(d, 16, 0xB000000000000000 | (1 << 50)),
    "min-over-avg": lambda d: patched(d, 24, 70000),
    "zero-min": lambda d: patched(d, 24, 0),
    "offsets-equal": lambda d: patched(d, end_offset(1), struct.unpack_from("<Q", d, end_offset(0))[0]),
    "offsets-decreasing": lambda d: patched(d, end_offset(1), 10),
    "chunk-bigger-than-max": lambda d: patched(
        d, end_offset(1), struct.unpack_from("<Q", d, end_offset(0))[0] + 262144 + 1),
    "garbage-after-tail": lambda d: d + b"garbage!",
    "item-sized-garbage-after-tail": lambda d: d + bytes(ITEM),
    "tail-copied-after-tail": lambda d: d + d[-ITEM:],
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_index(cli, blob, tmp_path, outdir, name):
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(CORRUPTIONS[name](blob["index"].read_bytes()))
    extract_fails(cli, bad, blob["store"], outdir, str(bad), "invalid index")


def test_corrupted_index_messages(cli, blob, tmp_path, outdir):
    """The specific defects are named."""
    data = blob["index"].read_bytes()
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(CORRUPTIONS["offsets-decreasing"](data))
    extract_fails(cli, bad, blob["store"], outdir, "chunk 1", "offset 10")
    bad.write_bytes(CORRUPTIONS["chunk-bigger-than-max"](data))
    extract_fails(cli, bad, blob["store"], outdir, "262145", "262144")
    bad.write_bytes(CORRUPTIONS["bad-magic"](data))
    extract_fails(cli, bad, blob["store"], outdir, "magic")


def test_index_is_not_an_index(cli, blob, outdir):
    """A random data file given as the index."""
    extract_fails(cli, blob["src"], blob["store"], outdir, str(blob["src"]))


@pytest.mark.parametrize("command", ["extract", "info", "list-chunks", "verify-index"])
def test_truncated_index_other_commands(cli, blob, tmp_path, command):
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(blob["index"].read_bytes()[:100])
    args = {
        "extract": ["-s", blob["store"], bad, tmp_path / "o"],
        "info": [bad],
        "list-chunks": [bad],
        "verify-index": [bad, blob["src"]],
    }[command]
    r = cli(command, *args)
    assert_clean_error(r, str(bad))
    assert not (tmp_path / "o").exists()


# ---- bad chunks in the store ------------------------------------------------------------------------

def index_chunks(index: Path):
    return parse_index(index.read_bytes()).chunks


def test_corrupted_chunk_flipped_bytes(cli, blob, tmp_path, outdir):
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[1]
    path = chunk_file(store, chunk.id.hex())
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    extract_fails(cli, blob["index"], store, outdir, chunk.id.hex(), str(path))


def test_corrupted_chunk_bad_frame(cli, blob, tmp_path, outdir):
    """Damage at the start of the zstd frame (after the magic): does not decode at all."""
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[0]
    path = chunk_file(store, chunk.id.hex())
    data = path.read_bytes()
    path.write_bytes(data[:4] + b"\xff" * 16 + data[20:])
    extract_fails(cli, blob["index"], store, outdir, chunk.id.hex(), str(path))


def test_truncated_chunk(cli, blob, tmp_path, outdir):
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[2]
    path = chunk_file(store, chunk.id.hex())
    path.write_bytes(path.read_bytes()[:-100])
    extract_fails(cli, blob["index"], store, outdir, chunk.id.hex(), str(path))


def test_chunk_with_garbage_after_frame(cli, blob, tmp_path, outdir):
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[0]
    path = chunk_file(store, chunk.id.hex())
    path.write_bytes(path.read_bytes() + b"trailing")
    extract_fails(cli, blob["index"], store, outdir, chunk.id.hex(), str(path))


def test_cacnk_holding_raw_bytes(cli, blob, tmp_path, outdir):
    """A .cacnk with the chunk's own (correct, uncompressed) bytes is not a valid compressed chunk."""
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[1]
    raw = blob["src"].read_bytes()[chunk.start:chunk.end]
    assert hashlib.new("sha512_256", raw).digest() == chunk.id
    path = chunk_file(store, chunk.id.hex())
    path.write_bytes(raw)
    extract_fails(cli, blob["index"], store, outdir, chunk.id.hex(), str(path))


def test_chunk_of_wrong_content(cli, blob, tmp_path, outdir):
    """A well-formed chunk file holding another chunk's data."""
    store = copy_store(blob["store"], tmp_path / "store")
    first, second = index_chunks(blob["index"])[:2]
    path = chunk_file(store, second.id.hex())
    path.write_bytes(chunk_file(store, first.id.hex()).read_bytes())
    extract_fails(cli, blob["index"], store, outdir, second.id.hex(), str(path))


def test_missing_chunk_two_stores(cli, blob, tmp_path, outdir):
    store = copy_store(blob["store"], tmp_path / "store")
    other = tmp_path / "other"
    other.mkdir()
    chunk = index_chunks(blob["index"])[1]
    chunk_file(store, chunk.id.hex()).unlink()
    r = cli("extract", "-s", store, "-s", other, blob["index"], outdir / "blob")
    assert_clean_error(r, chunk.id.hex(), str(store), str(other))
    assert no_stray_files(outdir, set()) == []


def test_missing_chunk_one_store(cli, blob, tmp_path, outdir):
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[0]
    chunk_file(store, chunk.id.hex()).unlink()
    extract_fails(cli, blob["index"], store, outdir, chunk.id.hex(), str(store))


# ---- bad store locations ------------------------------------------------------------------------------

def test_extract_store_is_a_file(cli, blob, tmp_path, outdir):
    notdir = tmp_path / "file-store"
    notdir.write_bytes(b"not a store")
    extract_fails(cli, blob["index"], notdir, outdir, str(notdir))


def test_make_store_is_a_file(cli, blob, tmp_path, outdir):
    notdir = tmp_path / "file-store"
    notdir.write_bytes(b"not a store")
    r = cli("make", "-s", notdir, outdir / "x.caibx", blob["src"])
    assert_clean_error(r, str(notdir))
    assert no_stray_files(outdir, set()) == []
    assert notdir.read_bytes() == b"not a store"


def test_extract_store_does_not_exist(cli, blob, tmp_path, outdir):
    extract_fails(cli, blob["index"], tmp_path / "nowhere", outdir, str(tmp_path / "nowhere"))


# ---- bad inputs and outputs ---------------------------------------------------------------------------

def test_make_input_does_not_exist(cli, tmp_path, outdir):
    missing = tmp_path / "missing.bin"
    r = cli("make", outdir / "x.caibx", missing)
    assert_clean_error(r, str(missing))
    assert no_stray_files(outdir, set()) == []


def test_make_input_is_a_directory(cli, tmp_path, outdir):
    folder = tmp_path / "folder"
    folder.mkdir()
    r = cli("make", outdir / "x.caibx", folder)
    assert_clean_error(r, str(folder), "directory")
    assert no_stray_files(outdir, set()) == []


def test_extract_index_does_not_exist(cli, blob, tmp_path, outdir):
    missing = tmp_path / "missing.caibx"
    extract_fails(cli, missing, blob["store"], outdir, str(missing))


def test_extract_index_is_a_directory(cli, blob, tmp_path, outdir):
    folder = tmp_path / "folder.caibx"
    folder.mkdir()
    extract_fails(cli, folder, blob["store"], outdir, str(folder), "directory")


def test_extract_output_directory_does_not_exist(cli, blob, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "blob"
    r = cli("extract", "-s", blob["store"], blob["index"], out)
    assert_clean_error(r, str(out))
    assert not (tmp_path / "no").exists()


def test_extract_output_is_a_directory(cli, blob, tmp_path, outdir):
    target = outdir / "blob"
    target.mkdir()
    r = cli("extract", "-s", blob["store"], blob["index"], target)
    assert_clean_error(r, str(target))
    assert target.is_dir() and list(target.iterdir()) == []
    assert no_stray_files(outdir, {"blob"}) == []


def test_extract_failure_keeps_existing_output(cli, blob, tmp_path, outdir):
    """A failed extract (missing chunk) leaves the previous file byte for byte, and no temp file."""
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[-1]
    chunk_file(store, chunk.id.hex()).unlink()
    target = outdir / "blob"
    old = random.Random(5).randbytes(700_001)
    target.write_bytes(old)
    r = cli("extract", "-s", store, blob["index"], target)
    assert_clean_error(r, chunk.id.hex())
    assert target.read_bytes() == old
    assert no_stray_files(outdir, {"blob"}) == []


def test_extract_failure_keeps_existing_output_bad_chunk(cli, blob, tmp_path, outdir):
    """Same with a corrupt chunk, and an old file that is a prefix of the right content."""
    store = copy_store(blob["store"], tmp_path / "store")
    chunk = index_chunks(blob["index"])[-1]
    path = chunk_file(store, chunk.id.hex())
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 32)
    target = outdir / "blob"
    old = blob["src"].read_bytes()[:100_000]
    target.write_bytes(old)
    r = cli("extract", "-s", store, blob["index"], target)
    assert_clean_error(r, chunk.id.hex(), str(path))
    assert target.read_bytes() == old
    assert no_stray_files(outdir, {"blob"}) == []


def test_extract_failure_keeps_existing_output_bad_index(cli, blob, tmp_path, outdir):
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(blob["index"].read_bytes()[:-3])
    target = outdir / "blob"
    target.write_bytes(b"precious")
    r = cli("extract", "-s", blob["store"], bad, target)
    assert_clean_error(r, str(bad))
    assert target.read_bytes() == b"precious"
    assert no_stray_files(outdir, {"blob"}) == []


def test_make_index_directory_does_not_exist(cli, blob, tmp_path):
    index = tmp_path / "no" / "dir" / "x.caibx"
    r = cli("make", "-s", tmp_path / "store", index, blob["src"])
    assert_clean_error(r, str(index))
    assert not (tmp_path / "no").exists()


def test_make_failure_keeps_existing_index(cli, tmp_path, outdir):
    index = outdir / "x.caibx"
    index.write_bytes(b"old index")
    r = cli("make", index, tmp_path / "missing.bin")
    assert_clean_error(r, "missing.bin")
    assert index.read_bytes() == b"old index"
    assert no_stray_files(outdir, {"x.caibx"}) == []


# ---- bad flags ----------------------------------------------------------------------------------------

def test_unknown_flag(cli, blob, outdir):
    r = cli("make", "--no-such-flag", outdir / "x.caibx", blob["src"])
    assert_clean_error(r, "--no-such-flag")
    assert no_stray_files(outdir, set()) == []


def test_unknown_command(cli):
    assert_clean_error(cli("no-such-command"), "no-such-command")


def test_missing_arguments(cli, outdir):
    assert_clean_error(cli("make", outdir / "x.caibx"))
    assert no_stray_files(outdir, set()) == []


@pytest.mark.parametrize("spec", ["", "a:b:c", "16:64", "16:64:256:1024", "64:16:256", "16:64:32",
                                  "0:0:0", "-16:64:256", "16:64:200000", "1.5:4:16"])
def test_invalid_chunk_size(cli, blob, outdir, spec):
    r = cli("make", f"--chunk-size={spec}", outdir / "x.caibx", blob["src"])
    assert_clean_error(r)
    assert no_stray_files(outdir, set()) == []


@pytest.mark.parametrize("digest", ["md5", "sha512", "SHA-256", "sha-256"])
def test_invalid_digest_make(cli, blob, outdir, digest):
    r = cli("make", "--digest", digest, outdir / "x.caibx", blob["src"])
    assert_clean_error(r, "digest")
    assert no_stray_files(outdir, set()) == []


def test_invalid_digest_extract(cli, blob, outdir):
    """--digest is global: an invalid value is fatal for every command, also before the command name."""
    r = cli("--digest", "md5", "extract", "-s", blob["store"], blob["index"], outdir / "blob")
    assert_clean_error(r, "md5")
    assert no_stray_files(outdir, set()) == []


def test_index_digest_mismatch(cli, blob, outdir):
    """A SHA512-256 index extracted with --digest sha256 is refused (desync's rule), nothing written."""
    r = cli("--digest", "sha256", "extract", "-s", blob["store"], blob["index"], outdir / "blob")
    assert_clean_error(r, str(blob["index"]))
    assert no_stray_files(outdir, set()) == []


def test_invalid_concurrency(cli, blob, outdir):
    r = cli("extract", "-n", "0", "-s", blob["store"], blob["index"], outdir / "blob")
    assert_clean_error(r)
    assert no_stray_files(outdir, set()) == []
