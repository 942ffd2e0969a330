"""Local store, router, failover group and cache, on real directories."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pydesync.codec import compress
from pydesync.digest import SHA256, ChunkId, digest_of
from pydesync.errors import ChunkInvalid, ChunkMissing, StoreError, UsageError
from pydesync.store import (
    CachedStore,
    FailoverGroup,
    LocalStore,
    Store,
    StoreOptions,
    StoreRouter,
    open_chain,
    open_store,
)

DATA = b"chunk data " * 1000
CID = digest_of(DATA)


def test_put_get_layout(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.put(CID, DATA)
    path = tmp_path / CID.hex()[:4] / f"{CID.hex()}.cacnk"
    assert path.is_file()
    assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert store.get(CID) == DATA
    assert store.has(CID)
    assert list(store.ids()) == [CID]
    assert store.stored_size(CID) == path.stat().st_size
    assert not list(store.temp_files())


def test_uncompressed_store_has_no_suffix(tmp_path: Path):
    store = LocalStore(tmp_path, StoreOptions(uncompressed=True))
    store.put(CID, DATA)
    assert (tmp_path / CID.hex()[:4] / CID.hex()).read_bytes() == DATA
    assert store.get(CID) == DATA
    assert list(store.ids()) == [CID]


def test_reads_fall_back_to_the_other_format(tmp_path: Path):
    """casync reads suffix-less raw chunks from a compressed store."""
    LocalStore(tmp_path, StoreOptions(uncompressed=True)).put(CID, DATA)
    assert LocalStore(tmp_path).get(CID) == DATA
    assert LocalStore(tmp_path).has(CID)


def test_symlink_means_missing(tmp_path: Path):
    folder = tmp_path / CID.hex()[:4]
    folder.mkdir()
    os.symlink("/dev/null", folder / CID.hex())
    store = LocalStore(tmp_path)
    assert not store.has(CID)
    with pytest.raises(ChunkMissing):
        store.get(CID)


def test_missing_chunk(tmp_path: Path):
    with pytest.raises(ChunkMissing) as e:
        LocalStore(tmp_path).get(CID)
    assert str(CID) in str(e.value) and str(tmp_path) in str(e.value)


def test_corrupt_chunk_named(tmp_path: Path):
    store = LocalStore(tmp_path)
    other = b"other bytes" * 50
    path = Path(store.chunk_path(CID))
    path.parent.mkdir()
    path.write_bytes(compress(other))
    with pytest.raises(ChunkInvalid) as e:
        store.get(CID)
    assert f"chunk id {CID} does not match its hash {digest_of(other)}" in str(e.value)
    assert str(path) in str(e.value)
    assert LocalStore(tmp_path, StoreOptions(skip_verify=True)).get(CID) == other


def test_sha256_chunks_verify(tmp_path: Path):
    cid = digest_of(DATA, SHA256)
    store = LocalStore(tmp_path)
    store.put(cid, DATA)
    assert store.get(cid, SHA256) == DATA
    assert store.get(cid) == DATA  # no digest given: both are tried, as casync does
    with pytest.raises(ChunkInvalid):
        store.get(cid, "sha512-256")


def test_store_must_be_a_directory(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        LocalStore(tmp_path / "file")
    with pytest.raises(StoreError, match="does not exist"):
        LocalStore(tmp_path / "nope")
    with pytest.raises(StoreError, match="not a directory"):
        LocalStore(tmp_path / "file", create=True)
    with pytest.raises(StoreError, match="new does not exist"):  # its parent must exist
        LocalStore(tmp_path / "new" / "store", create=True)
    assert not (tmp_path / "new").exists()
    assert LocalStore(tmp_path / "store", create=True).path.endswith("store")


def test_concurrent_writers(tmp_path: Path):
    """Many threads writing the same and different chunks: every chunk intact, no temp files left."""
    stores = [LocalStore(tmp_path) for _ in range(4)]
    payloads = [os.urandom(5000) for _ in range(20)]
    errors: list[BaseException] = []

    def writer(store: LocalStore) -> None:
        try:
            for p in payloads:
                store.put(digest_of(p), p)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = LocalStore(tmp_path)
    assert sorted(store.ids()) == sorted(digest_of(p) for p in payloads)
    assert all(store.get(digest_of(p)) == p for p in payloads)
    assert not list(store.temp_files())


def test_remove(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.put(CID, DATA)
    store.remove(CID)
    assert not store.has(CID)
    store.remove(CID)  # idempotent


class BrokenStore(Store):
    """A store whose every call fails with a non-'missing' error (a dead server)."""

    def __init__(self, name: str):
        self.location = name
        self.calls = 0

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        self.calls += 1
        raise StoreError(f"{self.location} is down")

    def has(self, chunk_id: ChunkId) -> bool:
        self.calls += 1
        raise StoreError(f"{self.location} is down")


def filled(path: Path) -> LocalStore:
    store = LocalStore(path, create=True)
    store.put(CID, DATA)
    return store


def test_router_falls_through_missing_only(tmp_path: Path):
    empty = LocalStore(tmp_path / "a", create=True)
    full = filled(tmp_path / "b")
    assert StoreRouter([empty, full]).get(CID) == DATA
    with pytest.raises(ChunkMissing) as e:
        StoreRouter([empty, LocalStore(tmp_path / "c", create=True)]).get(CID)
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "c") in str(e.value)
    with pytest.raises(StoreError, match="down"):
        StoreRouter([BrokenStore("dead"), full]).get(CID)


def test_failover_switches_on_errors(tmp_path: Path):
    dead = BrokenStore("dead")
    full = filled(tmp_path / "b")
    group = FailoverGroup([dead, full])
    assert group.get(CID) == DATA
    assert group.get(CID) == DATA
    assert dead.calls == 1  # stayed on the healthy member
    empty = LocalStore(tmp_path / "e", create=True)
    with pytest.raises(ChunkMissing):
        FailoverGroup([empty, full]).get(CID)  # missing is final: members are identical


def test_cache_fills_and_repairs(tmp_path: Path):
    upstream = filled(tmp_path / "up")
    cache = LocalStore(tmp_path / "cache", create=True)
    assert CachedStore(cache, upstream).get(CID) == DATA
    assert cache.has(CID)
    Path(cache.chunk_path(CID)).write_bytes(compress(b"wrong"))
    with pytest.raises(ChunkInvalid):
        CachedStore(cache, upstream, repair=False).get(CID)
    assert CachedStore(cache, upstream).get(CID) == DATA
    assert cache.get(CID) == DATA


def test_open_store_locations(tmp_path: Path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    group = open_store(f"{tmp_path}|{tmp_path}")
    assert isinstance(group, FailoverGroup) and len(group.members) == 2
    with pytest.raises(UsageError, match="unsupported store location"):
        open_store("ftp+x://host/x")
    chain = open_chain([str(tmp_path), str(tmp_path)], cache=str(tmp_path / "c"))
    assert isinstance(chain, CachedStore)
    assert isinstance(chain.upstream, StoreRouter)
