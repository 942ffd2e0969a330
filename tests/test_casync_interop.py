"""Interoperability with the real casync binary (blob indexes and chunk stores).

Everything runs on real files in tmp_path: casync writes, pydesync reads, and
the other way round; indexes made by both tools from the same file must be
byte-identical. The casync test vectors (stores with zstd, gzip and xz chunks,
SHA-256 ids) must extract to their regenerated inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean_error

KiB = 1024
MiB = 1024 * KiB

# pydesync `-m` (KiB) -> casync `--chunk-size=MIN:AVG:MAX` (bytes)
CHUNK_SIZES = ["16:64:256", "1:4:16", "2:8:32", "4:4:4", "8:16:64", "64:256:1024"]


def casync_sizes(kib_spec: str) -> str:
    return ":".join(str(int(v) * KiB) for v in kib_spec.split(":"))


def compressible(size: int, seed: int = 7) -> bytes:
    """Text-like data: repeated log lines with small variations."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "chunk", "store", "index", "casync", "desync", "blob"]
    lines = []
    total = 0
    n = 0
    while total < size:
        line = (f"{n:08d} level={rng.choice(['INFO', 'WARN', 'DEBUG'])} "
                f"{' '.join(rng.choice(words) for _ in range(rng.randint(3, 12)))} "
                f"value={rng.randint(0, 999)}\n")
        lines.append(line)
        total += len(line)
        n += 1
    return "".join(lines).encode()[:size]


INPUTS = {
    "random": lambda: random.Random(1).randbytes(3 * MiB),
    "compressible": lambda: compressible(2 * MiB + 777),
    "zeros": lambda: bytes(MiB + 12345),
    "empty": lambda: b"",
    "one-byte": lambda: b"\x5a",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("interop-inputs")
    paths = {}
    for name, make_data in INPUTS.items():
        path = folder / f"{name}.bin"
        path.write_bytes(make_data())
        paths[name] = path
    return paths


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_casync(casync: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([casync, *map(str, args)], check=True, capture_output=True)


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


# ---- casync writes, pydesync reads ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["random", "compressible", "zeros", "one-byte"])
def test_casync_make_pydesync_extract(casync, cli, inputs, tmp_path, name):
    src = inputs[name]
    store, index, out = tmp_path / "s.castr", tmp_path / "x.caibx", tmp_path / "out"
    run_casync(casync, "make", f"--store={store}", index, src)
    r = cli("extract", "-s", store, index, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()


def test_casync_make_empty_then_pydesync_extract(casync, cli, inputs, tmp_path):
    """casync make of an empty file writes a zero-chunk index and does not even create the store."""
    store, index, out = tmp_path / "s.castr", tmp_path / "x.caibx", tmp_path / "out"
    run_casync(casync, "make", f"--store={store}", index, inputs["empty"])
    assert index.stat().st_size == 104
    assert not store.exists()
    # Like desync, pydesync insists that a local store exists, even when no chunk is needed.
    assert_clean_error(cli("extract", "-s", store, index, out), str(store))
    assert not out.exists()
    store.mkdir()
    r = cli("extract", "-s", store, index, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b""


# ---- pydesync writes, casync reads ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(INPUTS))
def test_pydesync_make_casync_extract(casync, cli, inputs, tmp_path, name):
    src = inputs[name]
    store, index, out = tmp_path / "s.castr", tmp_path / "x.caibx", tmp_path / "out"
    r = cli("make", "-s", store, index, src)
    assert r.returncode == 0, r.stderr
    run_casync(casync, "extract", f"--store={store}", index, out)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("digest", ["sha512-256", "sha256"])
def test_pydesync_make_casync_extract_digest(casync, cli, inputs, tmp_path, digest):
    src = inputs["compressible"]
    store, index, out = tmp_path / "s.castr", tmp_path / "x.caibx", tmp_path / "out"
    r = cli("make", "--digest", digest, "-m", "2:8:32", "-s", store, index, src)
    assert r.returncode == 0, r.stderr
    run_casync(casync, "extract", f"--store={store}", index, out)
    assert out.read_bytes() == src.read_bytes()


def test_uncompressed_store_extractable_by_casync(casync, cli, inputs, tmp_path):
    """Suffix-less raw chunks written by pydesync (store-options uncompressed) are read by casync."""
    src = inputs["random"]
    store, index, out = tmp_path / "raw.castr", tmp_path / "x.caibx", tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"store-options": {str(store.resolve()): {"uncompressed": True}}}))
    r = cli("--config", config, "make", "-m", "4:16:64", "-s", store, index, src)
    assert r.returncode == 0, r.stderr
    files = chunk_files(store)
    assert files, "no chunks written"
    for f in files:
        assert len(f.name) == 64 and "." not in f.name, f
        data = f.read_bytes()
        assert hashlib.new("sha512_256", data).hexdigest() == f.name  # raw, uncompressed bytes
    run_casync(casync, "extract", f"--store={store}", index, out)
    assert out.read_bytes() == src.read_bytes()
    # and pydesync reads its own uncompressed store back too
    out2 = tmp_path / "out2"
    r = cli("--config", config, "extract", "-s", store, index, out2)
    assert r.returncode == 0, r.stderr
    assert out2.read_bytes() == src.read_bytes()


# ---- byte-identical indexes ----------------------------------------------------------------------

def make_both(casync, cli, src: Path, tmp_path: Path, sizes: str,
              digest: str | None = None) -> tuple[bytes, bytes]:
    ca_index, py_index = tmp_path / "casync.caibx", tmp_path / "pydesync.caibx"
    ca_args = [f"--store={tmp_path / 'ca.castr'}", f"--chunk-size={casync_sizes(sizes)}"]
    py_args = ["-m", sizes]
    if digest:
        ca_args.append(f"--digest={digest}")
        py_args = ["--digest", digest, *py_args]
    run_casync(casync, "make", *ca_args, ca_index, src)
    r = cli("make", *py_args, py_index, src)
    assert r.returncode == 0, r.stderr
    return ca_index.read_bytes(), py_index.read_bytes()


@pytest.mark.parametrize("sizes", CHUNK_SIZES)
@pytest.mark.parametrize("name", list(INPUTS))
def test_index_identical(casync, cli, inputs, tmp_path, name, sizes):
    ca, py = make_both(casync, cli, inputs[name], tmp_path, sizes)
    assert py == ca
    n_chunks = (len(ca) - 104) // 40
    size = inputs[name].stat().st_size
    if name == "empty":
        assert n_chunks == 0
    elif name == "one-byte":
        assert n_chunks == 1
    elif sizes == "4:4:4":
        assert n_chunks == -(-size // (4 * KiB))


@pytest.mark.parametrize("sizes", ["16:64:256", "1:4:16", "4:4:4"])
@pytest.mark.parametrize("name", ["random", "compressible", "zeros", "empty", "one-byte"])
def test_index_identical_sha256(casync, cli, inputs, tmp_path, name, sizes):
    ca, py = make_both(casync, cli, inputs[name], tmp_path, sizes, digest="sha256")
    assert py == ca
    flags = int.from_bytes(ca[16:24], "little")
    assert flags == 0x9000000000000000


def test_index_header_defaults(casync, cli, inputs, tmp_path):
    """Sanity check on what both write: casync's blob flags and the default sizes."""
    ca, py = make_both(casync, cli, inputs["random"], tmp_path, "16:64:256")
    assert py == ca
    flags, cmin, cavg, cmax = (int.from_bytes(ca[o:o + 8], "little") for o in (16, 24, 32, 40))
    assert (flags, cmin, cavg, cmax) == (0xB000000000000000, 16384, 65536, 262144)


# ---- the casync test vectors ---------------------------------------------------------------------

VECTORS = [
    # (index, store, input, global flags)
    ("blob.caibx", "blob.castr", "blob.bin", []),                        # zstd, dedup
    ("blob-min.caibx", "blob-min.castr", "blob-min.bin", []),            # cut at exactly min
    ("blob-min-gzip.caibx", "blob-min-gzip.castr", "blob-min.bin", []),  # gzip chunks
    # xz chunks, SHA-256 ids (like desync, pydesync wants --digest to match the index)
    ("blob-min-sha256.caibx", "blob-min-sha256-xz.castr", "blob-min.bin", ["--digest", "sha256"]),
    ("zeros.caibx", "zeros.castr", "zeros.bin", []),                     # null chunks
]


def expected_input_sums(casync_data: Path) -> dict[str, str]:
    sums = {}
    for line in (casync_data / "SHA256SUMS.inputs").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


@pytest.mark.parametrize(("index", "store", "blob", "flags"), VECTORS)
def test_vector_extract(cli, casync_data, casync_inputs, tmp_path, index, store, blob, flags):
    out = tmp_path / "out"
    r = cli(*flags, "extract", "-s", casync_data / store, casync_data / index, out)
    assert r.returncode == 0, r.stderr
    digest = sha256_file(out)
    assert digest == expected_input_sums(casync_data)[blob]
    assert digest == sha256_file(casync_inputs / blob)


@pytest.mark.parametrize(("index", "blob", "args"), [
    ("blob.caibx", "blob.bin", []),
    ("blob-min.caibx", "blob-min.bin", []),
    ("blob-min-sha256.caibx", "blob-min.bin", ["--digest", "sha256"]),
    ("zeros.caibx", "zeros.bin", []),
])
def test_vector_index_reproduced(cli, casync_data, casync_inputs, tmp_path, index, blob, args):
    """pydesync make of a regenerated input writes the vector's index byte for byte."""
    out = tmp_path / index
    r = cli(*args, "make", out, casync_inputs / blob)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (casync_data / index).read_bytes()


def test_casync_extracts_vector_index_from_pydesync_store(casync, cli, casync_data, casync_inputs, tmp_path):
    """A pydesync-made store of a vector input is read by casync using the vector's own index."""
    store, out = tmp_path / "s.castr", tmp_path / "out"
    r = cli("make", "-s", store, tmp_path / "blob.caibx", casync_inputs / "blob.bin")
    assert r.returncode == 0, r.stderr
    run_casync(casync, "extract", f"--store={store}", casync_data / "blob.caibx", out)
    assert sha256_file(out) == expected_input_sums(casync_data)["blob.bin"]
