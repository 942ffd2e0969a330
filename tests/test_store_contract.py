"""One contract, every kind of store: what any caller may rely on, run against each kind for real
(a local folder, encrypted too; our chunk-server over HTTP; casync's protocol through a real
sshd; SFTP through it; moto's S3 server; fake-gcs-server for GCS; docker-registry for OCI; a chain
and a cache).

- a chunk put (or pushed) is there and reads back as it was, checked;
- a chunk that is not there is ChunkMissing; one whose stored bytes decode to other data, or
  do not decode, is ChunkInvalid naming the chunk (a cache repairs it from upstream instead);
- writers of one chunk at once leave one good chunk;
- a store that says it can list (`listable`) lists what it holds and prune keeps exactly what
  it is told to; one that says it cannot refuses clearly;
- stored bytes pass through: put_stored in any format reads back, get_stored's bytes decode
  with the format it names; a read-only store refuses writes clearly.

The per-kind test files keep what is particular to their kind.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GcsServer, S3Server, Sshd
from sshd_util import REMOTE_PYDESYNC

from pydesync.digest import ChunkId, digest_of
from pydesync.errors import ChunkInvalid, ChunkMissing, StoreError
from pydesync.store import CachedStore, LocalStore, Store, StoreOptions, StoreRouter, open_store
from pydesync.store.converters import COMPRESSED, PLAIN, Converters
from pydesync.storeops import prune

KEY = "a" * 64  # an encryption key (hex)


@dataclass
class Subject:
    """A store under test and what the test may do behind its back."""

    store: Store
    plant: Callable[[ChunkId, bytes], None]  # raw bytes where the store keeps the chunk (in `fmt`)
    fmt: Converters
    put: Callable[[ChunkId, bytes], None]  # place a chunk (the store's put, or behind a read-only one)
    repairs: bool = False  # a cache: a bad cached chunk is fetched again from upstream

    def place(self, chunk_id: ChunkId, data: bytes) -> None:
        self.put(chunk_id, data)
        self.store.flush()


Plant = Callable[[ChunkId, bytes], None]


def local(folder: Path, options: StoreOptions | None = None) -> tuple[LocalStore, Plant]:
    store = LocalStore(folder, options, create=True)

    def plant(chunk_id: ChunkId, stored: bytes) -> None:
        path = Path(store.chunk_path(chunk_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stored)

    return store, plant


KINDS = ["local", "encrypted", "http", "ssh", "sftp", "s3", "gcs", "oci", "chain", "cache"]


@pytest.fixture(params=KINDS)
def subject(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Subject]:
    kind = request.param
    store: Store
    if kind in ("local", "encrypted"):
        options = StoreOptions(encryption=True, encryption_key=KEY) if kind == "encrypted" else None
        store, plant = local(tmp_path / "store", options)
        subject = Subject(store, plant, store.converters, store.put)
    elif kind == "http":
        _, plant = local(tmp_path / "store")
        serve = request.getfixturevalue("serve")
        _, port, _ = serve("chunk-server", "-s", tmp_path / "store", "-w")
        store = open_store(f"http://127.0.0.1:{port}/")
        subject = Subject(store, plant, COMPRESSED, store.put)
    elif kind in ("ssh", "sftp"):
        sshd: Sshd = request.getfixturevalue("sshd")
        monkeypatch.setenv("CASYNC_SSH_PATH", sshd.ssh)
        monkeypatch.setenv("CASYNC_REMOTE_PATH", REMOTE_PYDESYNC)
        _, plant = local(tmp_path / "store")
        store = open_store(f"{kind}://127.0.0.1{tmp_path / 'store'}")
        subject = Subject(store, plant, COMPRESSED, store.put)
    elif kind == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        bucket = s3.bucket()
        store = open_store(f"s3+http://127.0.0.1:{s3.port}/{bucket}/chunks?lookup=path")
        client = s3.client()

        def plant(chunk_id: ChunkId, stored: bytes) -> None:
            client.put_object(Bucket=bucket, Key=store.key(chunk_id), Body=stored)  # type: ignore[attr-defined]

        subject = Subject(store, plant, COMPRESSED, store.put)
    elif kind == "gcs":
        gcs: GcsServer = request.getfixturevalue("gcs_server")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        store = open_store(f"gs://{gcs.bucket()}/chunks")
        raw = store._bucket  # type: ignore[attr-defined]

        def plant(chunk_id: ChunkId, stored: bytes) -> None:
            raw.blob(store.key(chunk_id)).upload_from_string(stored)  # type: ignore[attr-defined]

        subject = Subject(store, plant, COMPRESSED, store.put)
    elif kind == "oci":
        registry = request.getfixturevalue("registry")
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
        store = open_store(registry.store(f"contract/{os.path.basename(tmp_path)}".lower()))
        subject = Subject(store, store.put_stored, COMPRESSED, store.put)  # (put_stored does not verify)
    elif kind == "chain":
        first, plant = local(tmp_path / "a")
        second, _ = local(tmp_path / "b")
        store = StoreRouter([first, second])
        subject = Subject(store, plant, COMPRESSED, second.put)  # (chunks found through the first miss)
    else:
        cache, plant = local(tmp_path / "cache")
        upstream, _ = local(tmp_path / "upstream")
        store = CachedStore(cache, upstream)

        def put_both(chunk_id: ChunkId, data: bytes) -> None:  # (what a read through it leaves)
            upstream.put(chunk_id, data)
            cache.put(chunk_id, data)

        subject = Subject(store, plant, COMPRESSED, put_both, repairs=True)
    try:
        yield subject
    finally:
        store.close()


def chunk(seed: int, size: int = 50_000) -> tuple[ChunkId, bytes]:
    data = random.Random(seed).randbytes(size)
    return digest_of(data), data


def test_a_chunk_reads_back_as_it_was_put(subject: Subject):
    chunk_id, data = chunk(1)
    assert not subject.store.has(chunk_id)
    subject.place(chunk_id, data)
    assert subject.store.has(chunk_id)
    assert subject.store.get(chunk_id) == data
    assert subject.store.get(chunk_id, "sha512-256") == data


def test_a_missing_chunk_is_chunk_missing(subject: Subject):
    chunk_id, _ = chunk(2)
    assert not subject.store.has(chunk_id)
    with pytest.raises(ChunkMissing) as caught:
        subject.store.get(chunk_id)
    assert str(chunk_id) in str(caught.value)


@pytest.mark.parametrize("damage", ["other data", "not decodable"])
def test_a_damaged_chunk_is_named(subject: Subject, damage: str):
    chunk_id, data = chunk(3)
    _, other = chunk(4)
    subject.put(chunk_id, data)  # (upstream, for a cache; what the damage replaces elsewhere)
    subject.store.flush()
    bad = subject.fmt.encode(other) if damage == "other data" else b"\x28\xb5\x2f\xfd garbage"
    subject.plant(chunk_id, bad)
    if subject.repairs:
        assert subject.store.get(chunk_id) == data
        assert subject.store.get(chunk_id) == data  # (the cache holds the good chunk now)
        return
    with pytest.raises(ChunkInvalid) as caught:
        subject.store.get(chunk_id)
    assert str(chunk_id) in str(caught.value)


def test_writers_of_one_chunk_at_once_leave_one_good_chunk(subject: Subject):
    chunk_id, data = chunk(5)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            subject.put(chunk_id, data)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    subject.store.flush()
    assert subject.store.get(chunk_id) == data
    if subject.store.listable:
        assert list(subject.store.ids()).count(chunk_id) == 1


def test_listing_and_prune_do_what_the_store_declares(subject: Subject):
    chunks = [chunk(10 + i, 5_000) for i in range(4)]
    for chunk_id, data in chunks:
        subject.place(chunk_id, data)
    store = subject.store
    if not store.listable:
        with pytest.raises(StoreError):
            list(store.ids())
        return
    assert set(store.ids()) == {i for i, _ in chunks}
    keep = {chunks[0][0], chunks[2][0]}
    assert prune(store, keep) == 2
    assert set(store.ids()) == keep
    assert store.get(chunks[0][0]) == chunks[0][1]


@pytest.mark.parametrize("fmt", [COMPRESSED, PLAIN], ids=["compressed", "plain"])
def test_stored_bytes_pass_through(subject: Subject, fmt: Converters):
    chunk_id, data = chunk(20)
    store = subject.store
    if not store.writable:
        with pytest.raises(StoreError):
            store.put_stored(chunk_id, fmt.encode(data), fmt)
        subject.place(chunk_id, data)
    else:
        store.put_stored(chunk_id, fmt.encode(data), fmt)
        store.flush()
    assert store.get(chunk_id) == data
    stored, stored_fmt = store.get_stored(chunk_id)
    assert stored_fmt.decode(stored) == data
