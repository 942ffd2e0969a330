"""Encryption at rest, as desync does it: converter layers, names, keys, validation, servers.

A chunk file of an encrypted store is `nonce || AEAD(key, nonce, layer below)`
with no associated data, named `<id>[.cacnk].<alg>-<keyid>`; these tests
check that layout byte for byte (so the store is shared with desync) and the
behaviour around it: round trips, key separation, repair, cache, chunk-server.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from conftest import assert_clean_error, need
from procutil import HANG_GUARD, free_port, start_server, stop

from pydesync.codec import compress
from pydesync.digest import digest_of
from pydesync.errors import ChunkInvalid, UsageError
from pydesync.index import read_index
from pydesync.store import CachedStore, LocalStore, StoreOptions
from pydesync.store.converters import (
    COMPRESSED,
    MISSING_EXTRA,
    PLAIN,
    Compression,
    Converters,
    Encryption,
    converters_for,
    wire_converters,
)

try:  # the `crypto` extra
    import nacl.bindings as nacl_bindings
    from cryptography.hazmat.primitives.ciphers import aead
except ImportError:
    nacl_bindings = aead = None  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def crypto_libraries() -> None:
    need(nacl_bindings is not None and aead is not None,
         "pynacl and cryptography not installed (pip install 'pydesync[crypto]')")

# desync's unit-test key: the ASCII string, hex-encoded in configs.
DESYNC_KEY = b"change this password to a secret"
KEY = DESYNC_KEY.hex()
OTHER_KEY = b"totally different key used here!".hex()
ALGORITHMS = ["xchacha20-poly1305", "aes-256-gcm"]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def enc_options(key: str = KEY, algorithm: str | None = None, **extra: object) -> dict:
    options: dict = {"encryption": True, "encryption-key": key}
    if algorithm:
        options["encryption-algorithm"] = algorithm
    options.update(extra)
    return options


def write_config(path: Path, store_options: dict[str, dict]) -> Path:
    path.write_text(json.dumps({"store-options": store_options}))
    return path


def decrypt(raw: bytes, key: bytes, algorithm: str) -> bytes:
    """Independent decryption of a chunk file: nonce prefix, AEAD, no associated data."""
    if algorithm == "aes-256-gcm":
        return aead.AESGCM(key).decrypt(raw[:12], raw[12:], None)
    return nacl_bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(raw[24:], None, raw[:24], key)


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1.5 MiB of random data: a few dozen chunks with the default sizes."""
    path = tmp_path_factory.mktemp("blob") / "blob.bin"
    rng = random.Random(1234)
    path.write_bytes(rng.randbytes(1_200_000) + bytes(300_000))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DESYNC_ENCRYPTION_KEY", raising=False)


# ---- names and layout ----------------------------------------------------------------------------

def test_desync_key_id_fact():
    """desync's unit test: this key with AES-256-GCM gives `.aes-256-gcm-50d64035`."""
    assert KEY == "6368616e676520746869732070617373776f726420746f206120736563726574"
    assert hashlib.sha256(DESYNC_KEY).hexdigest()[:8] == "50d64035"
    assert Encryption(DESYNC_KEY, "aes-256-gcm").extension == ".aes-256-gcm-50d64035"
    opts = StoreOptions(encryption=True, encryption_key=KEY, encryption_algorithm="aes-256-gcm")
    assert converters_for(opts).extension == ".cacnk.aes-256-gcm-50d64035"
    opts = StoreOptions(uncompressed=True, encryption=True, encryption_key=KEY,
                        encryption_algorithm="aes-256-gcm")
    assert converters_for(opts).extension == ".aes-256-gcm-50d64035"
    assert converters_for(StoreOptions(encryption=True, encryption_key=KEY)).extension \
        == ".cacnk.xchacha20-poly1305-50d64035"
    assert converters_for(StoreOptions()).extension == ".cacnk"
    assert converters_for(StoreOptions(uncompressed=True)).extension == ""


@pytest.mark.parametrize("algorithm,nonce", [("xchacha20-poly1305", 24), ("aes-256-gcm", 12)])
def test_layer_layout(algorithm: str, nonce: int):
    layer = Encryption(DESYNC_KEY, algorithm)
    plain = b"some chunk data" * 100
    one, two = layer.encode(plain), layer.encode(plain)
    assert len(one) == nonce + len(plain) + 16          # nonce || ciphertext || tag
    assert one[:nonce] != two[:nonce]                    # a fresh random nonce each time
    assert decrypt(one, DESYNC_KEY, algorithm) == plain  # no associated data
    assert layer.decode(one) == plain
    assert layer.decode(two) == plain


def test_stack_order_and_reuse_of_shared_layers():
    enc = Encryption(DESYNC_KEY, "aes-256-gcm")
    stack = Converters([Compression(), enc])
    data = b"x" * 5000
    stored = stack.encode(data)
    # compression first, then encryption: decrypting gives a zstd frame
    inner = decrypt(stored, DESYNC_KEY, "aes-256-gcm")
    assert inner.startswith(ZSTD_MAGIC) and zstandard.ZstdDecompressor().decompress(inner) == data
    # a compressed chunk served compressed+encrypted is only encrypted (same zstd bytes inside)
    compressed = compress(data)
    wire = COMPRESSED.convert(compressed, stack)
    assert decrypt(wire, DESYNC_KEY, "aes-256-gcm") == compressed
    # and back: only decrypted, not recompressed
    assert stack.convert(wire, COMPRESSED) == compressed
    # no shared layer: decoded fully and re-encoded
    assert stack.convert(stored, PLAIN) == data
    assert Converters([enc]).convert(Converters([enc]).encode(data), PLAIN) == data
    # the same stack: bytes as they are
    assert stack.convert(stored, Converters([Compression(), Encryption(DESYNC_KEY, "aes-256-gcm")])) is stored


def test_decrypt_failures_are_invalid_chunks(tmp_path: Path):
    opts = StoreOptions(encryption=True, encryption_key=KEY)
    store = LocalStore(tmp_path, opts)
    data = b"payload " * 500
    cid = digest_of(data)
    store.put(cid, data)
    path = Path(store.chunk_path(cid))
    assert path.name == f"{cid.hex()}.cacnk.xchacha20-poly1305-50d64035"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    with pytest.raises(ChunkInvalid, match=f"invalid chunk {cid}: chacha20poly1305: message authentication"):
        store.get(cid)
    path.write_bytes(b"short")
    with pytest.raises(ChunkInvalid, match="no nonce prefix found in chunk"):
        store.get(cid)


def test_missing_crypto_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "nacl", None)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    for algorithm in ALGORITHMS:
        with pytest.raises(UsageError, match=r"needs the 'crypto' extra: pip install pydesync\[crypto\]"):
            Encryption(DESYNC_KEY, algorithm)
    assert MISSING_EXTRA == "encryption needs the 'crypto' extra: pip install pydesync[crypto]"


# ---- round trips through the CLI -----------------------------------------------------------------

@pytest.mark.parametrize("uncompressed", [False, True], ids=["compressed", "uncompressed"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_make_extract_round_trip(cli, clean_env, blob: Path, tmp_path: Path, algorithm: str,
                                 uncompressed: bool):
    store = tmp_path / "store"
    store.mkdir()
    opts = enc_options(algorithm=algorithm)
    if uncompressed:
        opts["uncompressed"] = True
    config = write_config(tmp_path / "config.json", {str(store): opts})
    index = tmp_path / "blob.caibx"
    r = cli("--config", config, "make", "-s", store, index, blob)
    assert r.returncode == 0, r.stderr
    ext = (".cacnk" if not uncompressed else "") + f".{algorithm}-50d64035"
    files = chunk_files(store)
    ids = {c.id.hex() for c in read_index(str(index))}
    assert len(files) == len(ids) > 5
    for f in files:
        assert f.name.endswith(ext) and f.name[:64] in ids and f.parent.name == f.name[:4]
        raw = f.read_bytes()
        assert not raw.startswith(ZSTD_MAGIC)
        with pytest.raises(zstandard.ZstdError):
            zstandard.ZstdDecompressor().decompress(raw)
        inner = decrypt(raw, DESYNC_KEY, algorithm)
        plain = inner if uncompressed else zstandard.ZstdDecompressor().decompressobj().decompress(inner)
        assert not uncompressed or not inner.startswith(ZSTD_MAGIC)
        assert hashlib.new("sha512_256", plain).hexdigest() == f.name[:64]
    out = tmp_path / "out.bin"
    r = cli("--config", config, "extract", "-s", store, index, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob.read_bytes()
    # the same store without the key sees no chunks at all
    r = cli("extract", "-s", store, index, tmp_path / "nokey.bin")
    assert_clean_error(r, "missing")


def test_key_from_environment(cli, monkeypatch: pytest.MonkeyPatch, blob: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    config = write_config(tmp_path / "config.json", {str(store): {"encryption": True}})
    index = tmp_path / "blob.caibx"
    r = cli("--config", config, "make", "-s", store, index, blob, env={"DESYNC_ENCRYPTION_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert all(f.name.endswith(".cacnk.xchacha20-poly1305-50d64035") for f in chunk_files(store))
    r = cli("--config", config, "extract", "-s", store, index, tmp_path / "out",
            env={"DESYNC_ENCRYPTION_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob.read_bytes()
    # the variable alone never turns encryption on
    plain = tmp_path / "plain"
    plain.mkdir()
    r = cli("make", "-s", plain, tmp_path / "p.caibx", blob, env={"DESYNC_ENCRYPTION_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert all(f.name.endswith(".cacnk") for f in chunk_files(plain))


def test_wrong_key_names_the_chunk(cli, clean_env, blob: Path, tmp_path: Path):
    """Files under the right name but encrypted with another key: a clear error naming the chunk."""
    store = tmp_path / "store"
    store.mkdir()
    config_a = write_config(tmp_path / "a.json", {str(store): enc_options(OTHER_KEY)})
    config_b = write_config(tmp_path / "b.json", {str(store): enc_options(KEY)})
    index = tmp_path / "blob.caibx"
    assert cli("--config", config_a, "make", "-s", store, index, blob).returncode == 0
    other_ext = converters_for(StoreOptions(encryption=True, encryption_key=OTHER_KEY)).extension
    our_ext = converters_for(StoreOptions(encryption=True, encryption_key=KEY)).extension
    for f in chunk_files(store):
        f.rename(f.with_name(f.name.replace(other_ext, our_ext)))
    r = cli("--config", config_b, "extract", "-s", store, index, tmp_path / "out")
    assert_clean_error(r, "invalid chunk ", "chacha20poly1305: message authentication failed")
    cid = r.stderr.split("invalid chunk ", 1)[1][:64]
    assert cid in {c.id.hex() for c in read_index(str(index))}
    assert not (tmp_path / "out").exists()


def test_two_keys_do_not_see_each_other(cli, clean_env, blob: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    config_a = write_config(tmp_path / "a.json", {str(store): enc_options(KEY)})
    config_b = write_config(tmp_path / "b.json", {str(store): enc_options(OTHER_KEY, "aes-256-gcm")})
    index = tmp_path / "blob.caibx"
    assert cli("--config", config_a, "make", "-s", store, index, blob).returncode == 0
    ids = {c.id.hex() for c in read_index(str(index))}
    store_a = LocalStore(store, StoreOptions(encryption=True, encryption_key=KEY))
    store_b = LocalStore(store, StoreOptions(encryption=True, encryption_key=OTHER_KEY,
                                             encryption_algorithm="aes-256-gcm"))
    assert {c.hex() for c in store_a.ids()} == ids
    assert list(store_b.ids()) == []
    assert not any(store_b.has(c) for c in store_a.ids())
    assert list(LocalStore(store).ids()) == []  # nor does a plain client
    # B writes its own copies next to A's
    assert cli("--config", config_b, "make", "-s", store, index, blob).returncode == 0
    ext_b = store_b.converters.extension
    assert ext_b.startswith(".cacnk.aes-256-gcm-") and ext_b != store_a.converters.extension
    assert len(chunk_files(store)) == 2 * len(ids)
    # pruning with B (keeping nothing but an empty index) leaves A's chunks alone
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert cli("make", "-s", tmp_path / "scratch", tmp_path / "empty.caibx", empty).returncode == 0
    r = cli("--config", config_b, "prune", "-y", "-s", store, tmp_path / "empty.caibx")
    assert r.returncode == 0, r.stderr
    assert {c.hex() for c in store_a.ids()} == ids and list(store_b.ids()) == []
    assert len(chunk_files(store)) == len(ids)
    # verify with B finds nothing to complain about (A's files are not its own)
    r = cli("--config", config_b, "verify", "-s", store)
    assert r.returncode == 0 and r.stderr == ""


def test_verify_repair_removes_undecryptable_chunks(cli, clean_env, blob: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    config = write_config(tmp_path / "config.json", {str(store): enc_options(algorithm="aes-256-gcm")})
    index = tmp_path / "blob.caibx"
    assert cli("--config", config, "make", "-s", store, index, blob).returncode == 0
    files = chunk_files(store)
    bad = files[2]
    raw = bytearray(bad.read_bytes())
    raw[20] ^= 0xFF
    bad.write_bytes(raw)
    r = cli("--config", config, "verify", "-s", store)
    assert r.returncode == 0
    assert r.stderr.strip() == f"invalid chunk {bad.name[:64]}: cipher: message authentication failed " \
                               f"({bad})"
    assert bad.exists()
    r = cli("--config", config, "verify", "-s", store, "-r")
    assert r.returncode == 0
    assert r.stderr.strip().endswith(": removed") and bad.name[:64] in r.stderr
    assert not bad.exists()
    assert chunk_files(store) == [f for f in files if f != bad]
    assert cli("--config", config, "verify", "-s", store).stderr == ""


def test_cache_with_encryption(cli, clean_env, blob: Path, tmp_path: Path):
    plain, cache = tmp_path / "plain", tmp_path / "cache"
    plain.mkdir()
    index = tmp_path / "blob.caibx"
    assert cli("make", "-s", plain, index, blob).returncode == 0
    config = write_config(tmp_path / "config.json", {str(cache): enc_options(algorithm="aes-256-gcm")})
    # `cache` re-encodes into the target's format: compressed, then encrypted
    r = cli("--config", config, "cache", "-s", plain, "-c", cache, index)
    assert r.returncode == 0, r.stderr
    files = chunk_files(cache)
    assert files and all(f.name.endswith(".cacnk.aes-256-gcm-50d64035") for f in files)
    # extract from the encrypted cache alone
    r = cli("--config", config, "extract", "-s", cache, index, tmp_path / "out1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out1").read_bytes() == blob.read_bytes()
    # an undecryptable cached chunk is repaired from the source (default --cache-repair)
    victim = files[0]
    victim.write_bytes(os.urandom(200))
    r = cli("--config", config, "extract", "-s", plain, "-c", cache, index, tmp_path / "out2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out2").read_bytes() == blob.read_bytes()
    assert decrypt(victim.read_bytes(), DESYNC_KEY, "aes-256-gcm").startswith(ZSTD_MAGIC)
    # ... and is a hard error without repair
    victim.write_bytes(os.urandom(200))
    r = cli("--config", config, "extract", "-r=false", "-s", plain, "-c", cache, index, tmp_path / "out3")
    assert_clean_error(r, f"invalid chunk {victim.name[:64]}")


def test_cached_store_repairs_decrypt_failure(tmp_path: Path):
    (tmp_path / "up").mkdir()
    (tmp_path / "cache").mkdir()
    upstream = LocalStore(tmp_path / "up")
    cache = LocalStore(tmp_path / "cache", StoreOptions(encryption=True, encryption_key=KEY))
    data = b"cached " * 999
    cid = digest_of(data)
    upstream.put(cid, data)
    Path(cache.chunk_path(cid)).parent.mkdir(parents=True)
    Path(cache.chunk_path(cid)).write_bytes(b"\0" * 64)
    assert CachedStore(cache, upstream).get(cid) == data
    assert cache.get(cid) == data
    Path(cache.chunk_path(cid)).write_bytes(b"\0" * 64)
    with pytest.raises(ChunkInvalid):
        CachedStore(cache, upstream, repair=False).get(cid)


# ---- chunk-server ----------------------------------------------------------------------------------

@contextlib.contextmanager
def chunk_server(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """A chunk-server subprocess on a port of its choosing; yields its URL."""
    full_env = dict(os.environ)
    full_env.pop("DESYNC_HTTP_AUTH", None)
    full_env.pop("DESYNC_ENCRYPTION_KEY", None)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as logs:
        proc, port = start_server("chunk-server", *args, stderr=Path(logs) / "stderr", env=full_env)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            stop(proc)


def get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HANG_GUARD)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_server_serves_encrypted_store_as_plain_chunks(cli, clean_env, blob: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    config = write_config(tmp_path / "config.json", {str(store): enc_options(algorithm="aes-256-gcm")})
    index = tmp_path / "blob.caibx"
    assert cli("--config", config, "make", "-s", store, index, blob).returncode == 0
    first = next(iter(read_index(str(index)))).id.hex()
    with chunk_server("--config", config, "-s", store) as url:
        status, body = get(url, f"/{first[:4]}/{first}.cacnk")
        assert status == 200 and body.startswith(ZSTD_MAGIC)  # decrypted, still compressed
        # the client knows nothing of encryption
        r = cli("extract", "-s", url, index, tmp_path / "out")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == blob.read_bytes()
        # a client asking for encrypted chunks is told to check its settings
        status, body = get(url, f"/{first[:4]}/{first}.cacnk.aes-256-gcm-50d64035")
        assert status == 400 and b"verify compression and encryption settings" in body
    with chunk_server("--config", config, "-s", store, "-u") as url:
        status, body = get(url, f"/{first[:4]}/{first}")
        assert status == 200 and hashlib.new("sha512_256", body).hexdigest() == first


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_server_serves_plain_store_encrypted(cli, clean_env, blob: Path, tmp_path: Path, algorithm: str):
    store = tmp_path / "store"
    store.mkdir()
    index = tmp_path / "blob.caibx"
    assert cli("make", "-s", store, index, blob).returncode == 0
    first = next(iter(read_index(str(index)))).id.hex()
    stored = next(store.rglob(f"{first}.cacnk")).read_bytes()
    with chunk_server("-s", store, "--encryption-key", KEY, "--encryption-algorithm", algorithm) as url:
        ext = f".cacnk.{algorithm}-50d64035"
        status, body = get(url, f"/{first[:4]}/{first}{ext}")
        assert status == 200
        assert decrypt(body, DESYNC_KEY, algorithm) == stored  # only encrypted, not recompressed
        status, _ = get(url, f"/{first[:4]}/{first}.cacnk")
        assert status == 400
        # a client configured with the key (HttpStore with the store-options) reads it all
        config = write_config(tmp_path / "config.json", {url: enc_options(algorithm=algorithm)})
        r = cli("--config", config, "extract", "-s", url, index, tmp_path / "out")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == blob.read_bytes()
        # a plain client is refused
        r = cli("extract", "-s", url, index, tmp_path / "plain-out")
        assert r.returncode != 0 and "400" in r.stderr


def test_writable_server_with_encrypted_wire(cli, clean_env, blob: Path, tmp_path: Path):
    """desync's TestChunkServerEncryption: clients upload encrypted, the store keeps its own format."""
    store = tmp_path / "store"
    store.mkdir()
    with chunk_server("-s", store, "-w", "--skip-verify-read=false", "--skip-verify-write=false",
                      "--encryption", env={"DESYNC_ENCRYPTION_KEY": KEY}) as url:
        config = write_config(tmp_path / "config.json", {url: enc_options()})
        index = tmp_path / "blob.caibx"
        r = cli("--config", config, "make", "-s", url, index, blob)
        assert r.returncode == 0, r.stderr
        files = chunk_files(store)
        assert files and all(f.name.endswith(".cacnk") and f.name.count(".") == 1 for f in files)
        r = cli("--config", config, "extract", "-s", url, index, tmp_path / "out")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == blob.read_bytes()


def test_server_environment_key_alone_does_not_encrypt(cli, blob: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    index = tmp_path / "blob.caibx"
    assert cli("make", "-s", store, index, blob).returncode == 0
    with chunk_server("-s", store, env={"DESYNC_ENCRYPTION_KEY": KEY}) as url:
        r = cli("extract", "-s", url, index, tmp_path / "out")
        assert r.returncode == 0, r.stderr


def test_wire_converters_from_flags(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DESYNC_ENCRYPTION_KEY", raising=False)
    assert wire_converters() == COMPRESSED
    assert wire_converters(uncompressed=True) == PLAIN
    assert wire_converters(key=KEY).extension == ".cacnk.xchacha20-poly1305-50d64035"
    for flags in ({"encryption": True}, {"algorithm": "aes-256-gcm"}):
        with pytest.raises(UsageError, match="no encryption key configured"):
            wire_converters(**flags)  # type: ignore[arg-type]
    monkeypatch.setenv("DESYNC_ENCRYPTION_KEY", KEY)
    assert wire_converters(uncompressed=True, algorithm="aes-256-gcm").extension == ".aes-256-gcm-50d64035"
    assert wire_converters() == COMPRESSED


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"encryption-key": KEY}, "encryption-key or encryption-algorithm configured without setting "
                              "encryption to true"),
    ({"encryption-algorithm": "aes-256-gcm"}, "encryption-key or encryption-algorithm configured without "
                                              "setting encryption to true"),
    ({"encryption": True}, "no encryption key configured"),
    ({"encryption": True, "encryption-key": ""}, "no encryption key configured"),
    ({"encryption": True, "encryption-key": "zz" * 32},
     "invalid encryption key, expected hex-encoded 256-bit key: encoding/hex: invalid byte: U+007A 'z'"),
    ({"encryption": True, "encryption-key": KEY[:-1]},
     "invalid encryption key, expected hex-encoded 256-bit key: encoding/hex: odd length hex string"),
    ({"encryption": True, "encryption-key": KEY[:32]}, "encryption key must be 32 bytes, got 16"),
    ({"encryption": True, "encryption-key": KEY, "encryption-algorithm": "rot13"},
     'encryption-algorithm: expected "aes-256-gcm" or "xchacha20-poly1305", got "rot13"'),
    ({"encryption": "yes", "encryption-key": KEY}, 'encryption: expected true or false, got "yes"'),
])
def test_store_option_validation(cli, clean_env, blob: Path, tmp_path: Path, options: dict, message: str):
    store = tmp_path / "store"
    store.mkdir()
    config = write_config(tmp_path / "config.json", {str(store): options})
    r = cli("--config", config, "make", "-s", store, tmp_path / "blob.caibx", blob)
    assert_clean_error(r, message)
    assert chunk_files(store) == []  # never silently plaintext


def test_index_locations_refuse_encryption(cli, clean_env, blob: Path, tmp_path: Path):
    store, indexes = tmp_path / "store", tmp_path / "indexes"
    store.mkdir()
    indexes.mkdir()
    config = write_config(tmp_path / "config.json", {str(indexes): enc_options()})
    target = indexes / "blob.caibx"
    r = cli("--config", config, "make", "-s", store, target, blob)
    assert_clean_error(r, f'store options for "{target}": encryption is not supported by index stores')
    assert not target.exists()
    assert cli("make", "-s", store, target, blob).returncode == 0
    r = cli("--config", config, "extract", "-s", store, target, tmp_path / "out")
    assert_clean_error(r, "encryption is not supported by index stores")
    # any encryption option counts, even one that would be invalid for a chunk store
    config = write_config(tmp_path / "config2.json", {str(indexes): {"encryption-algorithm": "aes-256-gcm"}})
    r = cli("--config", config, "list-chunks", target)
    assert_clean_error(r, "encryption is not supported by index stores")
    r = cli("--config", config, "index-server", "-s", indexes, "-l", f"127.0.0.1:{free_port()}")
    assert_clean_error(r, "encryption is not supported by index stores")


@pytest.mark.parametrize("flags", [["--encryption"], ["--encryption-algorithm", "aes-256-gcm"]])
def test_chunk_server_without_key(cli, clean_env, tmp_path: Path, flags: list[str]):
    r = cli("chunk-server", "-s", tmp_path, *flags, "-l", f"127.0.0.1:{free_port()}",
            env={"DESYNC_ENCRYPTION_KEY": ""})
    assert_clean_error(r, "no encryption key configured")


def test_chunk_server_bad_key(cli, clean_env, tmp_path: Path):
    r = cli("chunk-server", "-s", tmp_path, "--encryption-key", "abc", "-l", f"127.0.0.1:{free_port()}")
    assert_clean_error(r, "invalid encryption key, expected hex-encoded 256-bit key")
