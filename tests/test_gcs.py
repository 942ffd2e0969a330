"""gs:// stores on Google's own API, against fake-gcs-server on 127.0.0.1 (the `gcs_server` fixture).

What every store does is in test_store_contract.py; here: the command line end to end with chunks
and indexes in a bucket, verify and prune, Application Default Credentials from a service
account key file (its token endpoint is a small server the test runs, which checks the signed
assertion with the key's public half), the HMAC path kept, and a missing bucket.
"""

from __future__ import annotations

import base64
import json
import random
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GcsServer, assert_clean_error, run_cli
from procutil import JsonHandler, serve_in_thread

from pydesync.index import read_index


def gcs_cli(gcs: GcsServer, *args: object, env: dict[str, str] | None = None):
    clean = {"GOOGLE_APPLICATION_CREDENTIALS": "", "S3_ACCESS_KEY": "", "S3_SECRET_KEY": "",
             "HOME": "/nonexistent"}  # (no gcloud or config credentials of the machine's)
    return run_cli(*map(str, args), env={**clean, **gcs.env, **(env or {})})


def blob(path: Path, seed: int, size: int = 600_000) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def test_make_and_extract_with_chunks_and_index_in_a_bucket(gcs_server: GcsServer, tmp_path: Path):
    data = blob(tmp_path / "blob", 1)
    bucket = gcs_server.bucket()
    store, index = f"gs://{bucket}/chunks", f"gs://{bucket}/indexes/blob.caibx"
    r = gcs_cli(gcs_server, "make", "-m", "16:64:256", "-s", store, index, tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    r = gcs_cli(gcs_server, "extract", "-s", store, index, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data
    r = gcs_cli(gcs_server, "list-chunks", index)
    assert r.returncode == 0 and len(r.stdout.split()) > 5, r.stderr


def test_verify_and_prune(gcs_server: GcsServer, tmp_path: Path):
    bucket = gcs_server.bucket()
    store = f"gs://{bucket}/chunks"
    blob(tmp_path / "a", 2)
    blob(tmp_path / "b", 3)
    for name in ("a", "b"):
        r = gcs_cli(gcs_server, "make", "-m", "16:64:256", "-s", store, tmp_path / f"{name}.caibx",
                    tmp_path / name)
        assert r.returncode == 0, r.stderr
    r = gcs_cli(gcs_server, "verify", "-s", store)
    assert r.returncode == 0, r.stderr
    r = gcs_cli(gcs_server, "prune", "-s", store, "--yes", tmp_path / "a.caibx")
    assert r.returncode == 0, r.stderr
    r = gcs_cli(gcs_server, "extract", "-s", store, tmp_path / "a.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    r = gcs_cli(gcs_server, "extract", "-s", store, tmp_path / "b.caibx", tmp_path / "out-b")
    assert_clean_error(r, "chunk")
    kept = {c.id for c in read_index(str(tmp_path / "a.caibx"))}
    r = gcs_cli(gcs_server, "info", "-s", store, tmp_path / "b.caibx")
    wanted = {c.id for c in read_index(str(tmp_path / "b.caibx"))}
    assert json.loads(r.stdout)["in-store"] == len(kept & wanted)


class TokenEndpoint:
    """OAuth 2.0's token endpoint for a service account (RFC 7523 JWT bearer grant), recording
    the assertions it was sent."""

    def __init__(self) -> None:
        self.assertions: list[str] = []
        endpoint = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
                endpoint.assertions.append(form["assertion"][0])
                self.reply_json({"access_token": f"token-{len(endpoint.assertions)}", "expires_in": 3600,
                                 "token_type": "Bearer"})

        self.server, base = serve_in_thread(Handler)
        self.url = f"{base}/token"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    yield endpoint
    endpoint.stop()


def service_account(tmp_path: Path, token_uri: str):
    """A service account key file (a key made here), and its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "pydesync-test", "private_key_id": "k1",
            "private_key": pem, "client_email": "chunks@pydesync-test.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": token_uri}
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(info))
    return path, key.public_key()


def test_credentials_from_a_service_account_key_file(gcs_server: GcsServer, tmp_path: Path,
                                                     token_endpoint: TokenEndpoint):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    path, public = service_account(tmp_path, token_endpoint.url)
    data = blob(tmp_path / "blob", 4)
    store = f"gs://{gcs_server.bucket()}/chunks"
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(path)}
    r = gcs_cli(gcs_server, "make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob", env=env)
    assert r.returncode == 0, r.stderr
    r = gcs_cli(gcs_server, "extract", "-s", store, tmp_path / "i.caibx", tmp_path / "out", env=env)
    assert r.returncode == 0 and (tmp_path / "out").read_bytes() == data, r.stderr
    assert len(token_endpoint.assertions) == 2  # (one token per command, reused for every chunk)
    head, claims, signature = token_endpoint.assertions[0].split(".")
    padded = [part + "=" * (-len(part) % 4) for part in (claims, signature)]
    payload = json.loads(base64.urlsafe_b64decode(padded[0]))
    assert payload["iss"] == "chunks@pydesync-test.iam.gserviceaccount.com"
    assert "devstorage.read_write" in payload["scope"]
    public.verify(base64.urlsafe_b64decode(padded[1]), f"{head}.{claims}".encode(), padding.PKCS1v15(),
                  hashes.SHA256())  # (raises if the key file's key did not sign it)


def test_hmac_keys_keep_gs_on_the_s3_api(monkeypatch: pytest.MonkeyPatch):
    from pydesync.store import open_store
    from pydesync.store.s3 import S3Store

    monkeypatch.setenv("S3_ACCESS_KEY", "GOOG1EXAMPLE")
    monkeypatch.setenv("S3_SECRET_KEY", "secret")
    store = open_store("gs://bucket/prefix")
    assert isinstance(store, S3Store) and "storage.googleapis.com" in store.objects.where.endpoint
    store.close()


def test_a_missing_bucket_is_one_clear_error(gcs_server: GcsServer, tmp_path: Path):
    blob(tmp_path / "blob", 5)
    r = gcs_cli(gcs_server, "make", "-s", "gs://no-such-bucket/chunks", tmp_path / "i.caibx",
                tmp_path / "blob")
    assert_clean_error(r, "no-such-bucket")
