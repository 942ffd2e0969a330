"""oci+http:// chunk stores against Debian's docker-registry (the distribution registry) on 127.0.0.1.

The fixture starts `docker-registry serve` with its storage in a temporary folder; variants
have manifest deletion off, or htpasswd (bcrypt) authentication on.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, USER, Registry, assert_clean_error, run_cli, start_registry
from tokenregistry import TokenRegistry, start_token_registry

from pydesync.digest import ChunkId
from pydesync.errors import StoreError
from pydesync.index import read_index
from pydesync.store import oci
from pydesync.store.base import StoreOptions
from pydesync.store.oci import OciStore


@pytest.fixture(scope="module")
def locked_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from start_registry(tmp_path_factory.mktemp("registry-auth"), auth=True)


@pytest.fixture(scope="module")
def no_delete_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from start_registry(tmp_path_factory.mktemp("registry-nodelete"), delete=False)


def blob(path: Path, seed: int, size: int = 500_000) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def oci_cli(*args: object, env: dict[str, str] | None = None):
    clean = {"DESYNC_OCI_USERNAME": "", "DESYNC_OCI_PASSWORD": "", "DOCKER_CONFIG": "/nonexistent"}
    return run_cli(*map(str, args), env={**clean, **(env or {})})


def manifest(registry: Registry, repository: str, tag: str) -> dict:
    import urllib3

    answer = urllib3.request("GET", f"http://127.0.0.1:{registry.port}/v2/{repository}/manifests/{tag}",
                             headers={"Accept": oci.MANIFEST_TYPE})
    assert answer.status == 200, answer.data
    return json.loads(answer.data)


def test_make_extract_round_trip_and_artifact_shape(registry: Registry, tmp_path: Path):
    data = blob(tmp_path / "blob", 1)
    store = registry.store("test/round-trip")
    r = oci_cli("make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    ids = {c.id.hex() for c in read_index(str(tmp_path / "i.caibx"))}
    with OciStore(store) as opened:
        assert set(opened.tags()) == {f"{i}.cacnk" for i in ids}
    first = sorted(ids)[0]
    m = manifest(registry, "test/round-trip", f"{first}.cacnk")
    assert m["artifactType"] == "application/vnd.desync.chunk.v1"
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": oci.EMPTY_DIGEST, "size": 2}
    assert m["config"] == empty
    assert len(m["layers"]) == 1 and m["layers"][0]["mediaType"] == "application/octet-stream"
    assert m["annotations"] == {"org.opencontainers.image.title": f"{first}.cacnk"}

    r = oci_cli("extract", "-s", store, "-c", tmp_path / "cache", tmp_path / "i.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data
    local = run_cli("make", "-s", tmp_path / "local", tmp_path / "l.caibx", tmp_path / "blob")
    assert local.returncode == 0
    # the blob is the stored chunk file itself (what a local store holds)
    path = tmp_path / "local" / first[:4] / f"{first}.cacnk"
    assert m["layers"][0]["size"] == path.stat().st_size


def test_prune_keeps_referenced_and_foreign_artifacts(registry: Registry, tmp_path: Path, monkeypatch):
    """prune deletes unreferenced chunk manifests only; a manifest with another artifact type under a
    chunk-shaped tag survives. Tags are listed page by page (a small page size here)."""
    store = registry.store("test/prune")
    blob(tmp_path / "a", 2)
    blob(tmp_path / "b", 3, 200_000)
    for name in ("a", "b"):
        assert oci_cli("make", "-s", store, tmp_path / f"{name}.caibx", tmp_path / name).returncode == 0
    keep = {c.id.hex() for c in read_index(str(tmp_path / "b.caibx"))}
    everything = keep | {c.id.hex() for c in read_index(str(tmp_path / "a.caibx"))}
    foreign = "f" * 64 + ".cacnk"
    with OciStore(store) as opened:  # an unrelated artifact under a chunk-shaped tag
        opened._push_blob(oci.EMPTY_BLOB, oci.EMPTY_TYPE)
        digest = opened._push_blob(b"not ours", "x")
        body = {"schemaVersion": 2, "mediaType": oci.MANIFEST_TYPE, "artifactType": "application/x-other",
                "config": {"mediaType": oci.EMPTY_TYPE, "digest": oci.EMPTY_DIGEST, "size": 2},
                "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": 8}]}
        answer = opened.client.request("PUT", opened.client.url(f"manifests/{foreign}"),
                                       body=json.dumps(body).encode(),
                                       headers={"Content-Type": oci.MANIFEST_TYPE})
        assert answer.status == 201
        monkeypatch.setattr(oci, "TAG_PAGE", 5)
        assert {i.hex() for i in opened.ids()} == everything | {"f" * 64}  # across pages
    r = oci_cli("prune", "-y", "-s", store, tmp_path / "b.caibx")
    assert r.returncode == 0, r.stderr
    with OciStore(store) as opened:
        assert set(opened.tags()) == {f"{i}.cacnk" for i in keep} | {foreign}
    r = oci_cli("extract", "-s", store, tmp_path / "b.caibx", tmp_path / "out")
    assert r.returncode == 0 and (tmp_path / "out").read_bytes() == (tmp_path / "b").read_bytes()


def test_registry_without_deletion_is_a_clear_error(no_delete_registry: Registry, tmp_path: Path):
    store = no_delete_registry.store("test/nodelete")
    blob(tmp_path / "a", 4)
    assert oci_cli("make", "-s", store, tmp_path / "a.caibx", tmp_path / "a").returncode == 0
    blob(tmp_path / "empty", 5, 0)
    assert run_cli("make", tmp_path / "e.caibx", tmp_path / "empty").returncode == 0
    assert_clean_error(oci_cli("prune", "-y", "-s", store, tmp_path / "e.caibx"),
                       "does not allow deleting manifests")


def test_missing_chunk_falls_through(registry: Registry, tmp_path: Path):
    data = blob(tmp_path / "a", 6)
    assert run_cli("make", "-s", tmp_path / "local", tmp_path / "a.caibx", tmp_path / "a").returncode == 0
    store = registry.store("test/empty-repo")
    r = oci_cli("extract", "-s", store, "-s", tmp_path / "local", tmp_path / "a.caibx", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o").read_bytes() == data
    r = oci_cli("extract", "-s", store, tmp_path / "a.caibx", tmp_path / "o2")
    assert_clean_error(r, "missing")


@pytest.mark.parametrize("how", ["environment", "config", "docker"])
def test_credentials(locked_registry: Registry, tmp_path: Path, how: str):
    """htpasswd authentication: credentials from DESYNC_OCI_*, from oci-credentials in the config
    (glob-matched), or from docker's config.json; wrong or no credentials are a clear error."""
    data = blob(tmp_path / "a", 7)
    store = locked_registry.store(f"test/creds-{how}")
    home = tmp_path / "home"
    (home / ".config" / "pydesync").mkdir(parents=True)
    env = {"HOME": str(home)}
    if how == "environment":
        env |= {"DESYNC_OCI_USERNAME": USER, "DESYNC_OCI_PASSWORD": PASSWORD}
    elif how == "config":
        pattern = f"oci+http://127.0.0.1:{locked_registry.port}/test/*"
        entry = {pattern: {"username": USER, "secret": PASSWORD}}
        (home / ".config" / "pydesync" / "config.json").write_text(json.dumps({"oci-credentials": entry}))
    else:
        (home / "docker").mkdir()
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (home / "docker" / "config.json").write_text(
            json.dumps({"auths": {f"127.0.0.1:{locked_registry.port}": {"auth": auth}}}))
        env["DOCKER_CONFIG"] = str(home / "docker")
    r = oci_cli("make", "-s", store, tmp_path / "a.caibx", tmp_path / "a", env=env)
    assert r.returncode == 0, r.stderr
    r = oci_cli("extract", "-s", store, tmp_path / "a.caibx", tmp_path / "o", env=env)
    assert r.returncode == 0 and (tmp_path / "o").read_bytes() == data

    wrong = {"HOME": str(home), "DESYNC_OCI_USERNAME": USER, "DESYNC_OCI_PASSWORD": "wrong"}
    assert_clean_error(oci_cli("extract", "-s", store, tmp_path / "a.caibx", tmp_path / "x", env=wrong),
                       "access denied", "credentials")
    assert_clean_error(oci_cli("extract", "-s", store, tmp_path / "a.caibx", tmp_path / "x",
                               env={"HOME": str(tmp_path)}), "access denied")
    assert not (tmp_path / "x").exists()


def test_bad_locations(tmp_path: Path):
    blob(tmp_path / "a", 8, 1000)
    assert run_cli("make", tmp_path / "i.caibx", tmp_path / "a").returncode == 0
    for location, words in (("oci+http://127.0.0.1:5000", "needs a registry and a repository"),
                            ("oci+http://127.0.0.1:5000/Upper/Case", "invalid repository name"),
                            ("oci+http://127.0.0.1:99999/r", "invalid port")):
        assert_clean_error(oci_cli("extract", "-s", location, tmp_path / "i.caibx", tmp_path / "o"), words)
    assert_clean_error(oci_cli("extract", "-s", "oci+http://127.0.0.1:5000/r", tmp_path / "i.caibx",
                               tmp_path / "o", env={"DESYNC_OCI_PASSWORD": "x"}), "DESYNC_OCI_USERNAME")


def test_store_options_reach_the_client():
    store = OciStore("oci+http://127.0.0.1:1/r", StoreOptions(error_retry=0, timeout=2))
    with pytest.raises(StoreError, match=r"127\.0\.0\.1"):
        store.has(ChunkId("ab" * 32))
    store.close()


# ---- token authentication (the ghcr.io / Docker Hub / Harbor flow), over TLS ----------------------

@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    yield from start_token_registry(tmp_path_factory.mktemp("registry-token"))


def token_cli(registry: TokenRegistry, command: str, *args: object, login: bool = False):
    """pydesync COMMAND --ca-cert (the test's certificate) ARGS, logged in or not."""
    return oci_cli(command, "--ca-cert", registry.ca_cert, *args,
                   env={"DESYNC_OCI_USERNAME": USER, "DESYNC_OCI_PASSWORD": PASSWORD} if login else None)


def test_bearer_tokens_push_with_credentials_and_pull_anonymously(token_registry: TokenRegistry,
                                                                   tmp_path: Path):
    data = blob(tmp_path / "blob", 11)
    store = token_registry.store("token/round-trip")
    del token_registry.requests[:]
    r = token_cli(token_registry, "make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob", login=True)
    assert r.returncode == 0, r.stderr
    push = "repository:token/round-trip:pull,push"
    assert token_registry.requests.count((push, True)) == 1  # (one token for every upload thread)
    r = token_cli(token_registry, "extract", "-s", store, tmp_path / "i.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data
    assert ("repository:token/round-trip:pull", False) in token_registry.requests


def test_a_push_the_token_does_not_allow_is_one_clear_error(token_registry: TokenRegistry, tmp_path: Path):
    blob(tmp_path / "blob", 12)
    r = token_cli(token_registry, "make", "-s", token_registry.store("token/anonymous"), tmp_path / "i.caibx",
                  tmp_path / "blob")
    assert_clean_error(r, "127.0.0.1")
    assert "credentials" in r.stderr


def test_an_expired_token_is_renewed_mid_run(token_registry: TokenRegistry, tmp_path: Path):
    """The pull token of the run is good; the push token comes expired: the registry refuses it, a
    new one is asked for once, and the run completes."""
    data = blob(tmp_path / "blob", 13)
    store = token_registry.store("token/renewal")
    push = "repository:token/renewal:pull,push"
    del token_registry.requests[:]
    token_registry.spoil.append(push)
    r = token_cli(token_registry, "make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob", login=True)
    assert r.returncode == 0, r.stderr
    assert token_registry.requests.count((push, True)) == 2 and not token_registry.spoil
    r = token_cli(token_registry, "extract", "-s", store, tmp_path / "i.caibx", tmp_path / "out")
    assert r.returncode == 0 and (tmp_path / "out").read_bytes() == data, r.stderr


def test_wrong_credentials_at_the_token_endpoint_are_one_clear_error(token_registry: TokenRegistry,
                                                                     tmp_path: Path):
    blob(tmp_path / "blob", 14)
    r = oci_cli("make", "--ca-cert", token_registry.ca_cert, "-s", token_registry.store("token/wrong"),
                tmp_path / "i.caibx", tmp_path / "blob",
                env={"DESYNC_OCI_USERNAME": USER, "DESYNC_OCI_PASSWORD": "not-the-password"})
    assert_clean_error(r, "127.0.0.1")
