"""s3+http:// chunk and index stores against a real S3 API server on 127.0.0.1 (moto's standalone
server): make/extract, cache, prune/verify, upgrade-s3, tar/untar/chop, retries through a faulty
proxy, size limits, and location parsing.

Two session servers: `s3_server` accepts any credentials (and unsigned requests, for public
buckets); `s3_auth_server` checks signatures against its one IAM key, for the credential lookups
and refusals. Each test gets its own bucket. Commands run as real processes with the credentials
in the environment (S3_ACCESS_KEY / S3_SECRET_KEY) unless a test is about credentials.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import S3Server, assert_clean_error, run_cli
from procutil import HANG_GUARD

from pydesync.digest import ChunkId
from pydesync.errors import ChunkMissing
from pydesync.index import read_index

KEY = re.compile(r"^([0-9a-f]{4})/(\1[0-9a-f]{60})\.cacnk$")


def blob(path: Path, seed: int, size: int = 600_000) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def s3_cli(server: S3Server, *args: object, env: dict[str, str] | None = None, home: Path | None = None):
    clean = {k: "" for k in os.environ if k.startswith(("AWS_", "S3_"))}
    full = {**clean, **server.env, **(env or {})}
    if home is not None:
        full["HOME"] = str(home)
    return run_cli(*map(str, args), env=full)


def keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", ())]


def test_make_extract_round_trip(s3_server: S3Server, tmp_path: Path):
    """Chunks land at <prefix><4 hex>/<id>.cacnk (the local layout) as application/zstd; extract
    reads them back; the index can live in the bucket too."""
    bucket = s3_server.bucket()
    data = blob(tmp_path / "blob", 1)
    store = f"s3+{s3_server.endpoint}/{bucket}/some/prefix"
    index = f"s3+{s3_server.endpoint}/{bucket}/indexes/blob.caibx"
    r = s3_cli(s3_server, "make", "-s", store, index, tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    found = keys(s3_server, bucket, "some/prefix/")
    local = tmp_path / "local"
    assert run_cli("make", "-s", local, tmp_path / "local.caibx", tmp_path / "blob").returncode == 0
    assert sorted(k.removeprefix("some/prefix/") for k in found) == sorted(
        str(p.relative_to(local)) for p in local.rglob("*.cacnk"))
    assert all(KEY.match(k.removeprefix("some/prefix/")) for k in found)
    head = s3_server.client().head_object(Bucket=bucket, Key=found[0])
    assert head["ContentType"] == "application/zstd"
    assert keys(s3_server, bucket, "indexes/") == ["indexes/blob.caibx"]

    r = s3_cli(s3_server, "extract", "-s", store, index, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data
    assert (tmp_path / "local.caibx").read_bytes() == s3_server.client().get_object(
        Bucket=bucket, Key="indexes/blob.caibx")["Body"].read()


def test_cache_and_chain(s3_server: S3Server, tmp_path: Path):
    """An S3 store as the cache target (`cache -c s3+...`) and behind a local cache (`-c dir`)."""
    bucket = s3_server.bucket()
    data = blob(tmp_path / "blob", 2)
    assert run_cli("make", "-s", tmp_path / "src", tmp_path / "i.caibx", tmp_path / "blob").returncode == 0
    store = f"s3+{s3_server.endpoint}/{bucket}"
    r = s3_cli(s3_server, "cache", "-s", tmp_path / "src", "-c", store, tmp_path / "i.caibx")
    assert r.returncode == 0, r.stderr
    assert len(keys(s3_server, bucket)) == len({c.id for c in read_index(str(tmp_path / "i.caibx"))})
    r = s3_cli(s3_server, "extract", "-s", store, "-c", tmp_path / "cache", tmp_path / "i.caibx",
               tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o").read_bytes() == data
    assert len(list((tmp_path / "cache").rglob("*.cacnk"))) == len(keys(s3_server, bucket))


def test_prune_verify_and_listing_past_one_page(s3_server: S3Server, tmp_path: Path):
    """More than 1,000 chunks: listings are paginated. prune keeps exactly what the kept index
    references; verify finds a corrupted object and -r removes it."""
    bucket = s3_server.bucket()
    store = f"s3+{s3_server.endpoint}/{bucket}/s"
    blob(tmp_path / "big", 3, 2_600_000)
    blob(tmp_path / "small", 4, 100_000)
    for name in ("big", "small"):
        r = s3_cli(s3_server, "make", "-m", "1:2:4", "-s", store, tmp_path / f"{name}.caibx", tmp_path / name)
        assert r.returncode == 0, r.stderr
    small = {c.id.hex() for c in read_index(str(tmp_path / "small.caibx"))}
    total = len(keys(s3_server, bucket, "s/"))
    assert total > 1000

    r = s3_cli(s3_server, "list-chunks", tmp_path / "big.caibx")
    assert r.returncode == 0
    r = s3_cli(s3_server, "prune", "-y", "-s", store, tmp_path / "small.caibx")
    assert r.returncode == 0, r.stderr
    left = keys(s3_server, bucket, "s/")
    assert {KEY.match(k[2:]).group(2) for k in left} == small  # type: ignore[union-attr]

    victim = left[0]
    s3_server.client().put_object(Bucket=bucket, Key=victim, Body=b"not a chunk")
    r = s3_cli(s3_server, "verify", "-s", store)
    assert r.returncode == 0 and victim.split("/")[-1].split(".")[0] in r.stderr
    r = s3_cli(s3_server, "verify", "-r", "-s", store)
    assert r.returncode == 0 and "removed" in r.stderr
    assert victim not in keys(s3_server, bucket, "s/")


def test_upgrade_s3_moves_the_flat_layout(s3_server: S3Server, tmp_path: Path):
    bucket = s3_server.bucket()
    data = blob(tmp_path / "blob", 5)
    assert run_cli("make", "-s", tmp_path / "src", tmp_path / "i.caibx", tmp_path / "blob").returncode == 0
    client = s3_server.client()
    for path in (tmp_path / "src").rglob("*.cacnk"):
        client.put_object(Bucket=bucket, Key=f"old/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="old/README", Body=b"not a chunk, left alone")
    store = f"s3+{s3_server.endpoint}/{bucket}/old"
    r = s3_cli(s3_server, "upgrade-s3", "-s", store)
    assert r.returncode == 0, r.stderr
    moved = len(list((tmp_path / "src").rglob("*.cacnk")))
    assert f"moved {moved} chunks" in r.stderr
    layout = [f"old/{p.relative_to(tmp_path / 'src')}" for p in (tmp_path / "src").rglob("*.cacnk")]
    assert sorted(keys(s3_server, bucket, "old/")) == sorted(["old/README", *layout])
    r = s3_cli(s3_server, "extract", "-s", store, tmp_path / "i.caibx", tmp_path / "o")
    assert r.returncode == 0 and (tmp_path / "o").read_bytes() == data
    assert "moved 0 chunks" in s3_cli(s3_server, "upgrade-s3", "-s", store).stderr


@pytest.mark.parametrize("source", ["config keys", "config credentials file", "aws profile"])
def test_credentials_without_s3_variables(s3_auth_server: S3Server, tmp_path: Path, source: str):
    """No S3_* variables: the config's s3-credentials entry for http://127.0.0.1:PORT (keys, or an
    aws-credentials-file with a profile), or the AWS chain (AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE)."""
    s3_server = s3_auth_server
    bucket = s3_server.bucket()
    data = blob(tmp_path / "blob", 6)
    home = tmp_path / "home"
    (home / ".config" / "pydesync").mkdir(parents=True)
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n"
                           f"[ci]\naws_access_key_id = {s3_server.access_key}\n"
                           f"aws_secret_access_key = {s3_server.secret_key}\n")
    env = {"S3_ACCESS_KEY": "", "S3_SECRET_KEY": "", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    entry: dict[str, str] = {}
    if source == "config keys":
        entry = {"access-key": s3_server.access_key, "secret-key": s3_server.secret_key}
    elif source == "config credentials file":
        entry = {"aws-credentials-file": str(credentials), "aws-profile": "ci"}
    else:
        env |= {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_PROFILE": "ci"}
    if entry:
        config = {"s3-credentials": {s3_server.endpoint: entry}}
        (home / ".config" / "pydesync" / "config.json").write_text(json.dumps(config))
    store = f"s3+{s3_server.endpoint}/{bucket}"
    r = s3_cli(s3_server, "make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob", env=env, home=home)
    assert r.returncode == 0, r.stderr
    r = s3_cli(s3_server, "extract", "-s", store, tmp_path / "i.caibx", tmp_path / "o", env=env, home=home)
    assert r.returncode == 0 and (tmp_path / "o").read_bytes() == data


def test_tar_index_and_chop_into_s3(s3_server: S3Server, tmp_path: Path):
    """tar -i writes a tree's chunks and its .caidx to a bucket, untar -i restores it; chop stores
    the chunks of a file an index describes."""
    bucket = s3_server.bucket()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    blob(tree / "sub" / "f", 12, 300_000)
    (tree / "small").write_text("hello\n")
    store = f"s3+{s3_server.endpoint}/{bucket}/trees"
    index = f"s3+{s3_server.endpoint}/{bucket}/idx/tree.caidx"
    r = s3_cli(s3_server, "tar", "-i", "-s", store, index, tree)
    assert r.returncode == 0, r.stderr
    r = s3_cli(s3_server, "untar", "-i", "-s", store, index, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "sub" / "f").read_bytes() == (tree / "sub" / "f").read_bytes()
    assert (tmp_path / "out" / "small").read_text() == "hello\n"

    blob(tmp_path / "file", 13)
    assert run_cli("make", tmp_path / "file.caibx", tmp_path / "file").returncode == 0
    chopped = f"s3+{s3_server.endpoint}/{bucket}/chopped"
    r = s3_cli(s3_server, "chop", "-s", chopped, tmp_path / "file.caibx", tmp_path / "file")
    assert r.returncode == 0, r.stderr
    r = s3_cli(s3_server, "extract", "-s", chopped, tmp_path / "file.caibx", tmp_path / "file.out")
    assert r.returncode == 0 and (tmp_path / "file.out").read_bytes() == (tmp_path / "file").read_bytes()


# (anonymous requests are not tested: moto's authenticating server answers unsigned ones with a 500)
@pytest.mark.parametrize("case", ["wrong secret", "unknown key"])
def test_refused_credentials_are_a_clear_error(s3_auth_server: S3Server, tmp_path: Path, case: str):
    s3_server = s3_auth_server
    bucket = s3_server.bucket()
    blob(tmp_path / "blob", 7)
    env = {"wrong secret": {"S3_SECRET_KEY": "wrong"},
           "unknown key": {"S3_ACCESS_KEY": "AKIANOBODY", "S3_SECRET_KEY": "x"}}[case]
    r = s3_cli(s3_server, "make", "-s", f"s3+{s3_server.endpoint}/{bucket}", tmp_path / "i.caibx",
               tmp_path / "blob", env=env)
    assert_clean_error(r, "access denied", bucket)
    assert keys(s3_server, bucket) == []  # (no prefix: see conftest._moto)
    assert not (tmp_path / "i.caibx").exists()


def test_missing_bucket_and_bad_locations(s3_server: S3Server, tmp_path: Path):
    blob(tmp_path / "blob", 8)
    assert run_cli("make", tmp_path / "i.caibx", tmp_path / "blob").returncode == 0
    r = s3_cli(s3_server, "extract", "-s", f"s3+{s3_server.endpoint}/no-such-bucket/p", tmp_path / "i.caibx",
               tmp_path / "o")
    assert_clean_error(r, "bucket 'no-such-bucket' does not exist")
    assert not (tmp_path / "o").exists()
    for bad, words in ((f"s3+{s3_server.endpoint}", "no bucket"),
                       (f"s3+{s3_server.endpoint}/b?lookup=sideways", "invalid lookup"),
                       ("s3+http://127.0.0.1:99999/b", "invalid port")):
        r = s3_cli(s3_server, "extract", "-s", bad, tmp_path / "i.caibx", tmp_path / "o")
        assert_clean_error(r, words)


class _FaultyProxy(BaseHTTPRequestHandler):
    """Forwards to the S3 server, with faults: `slow` answers every third request with 503
    SlowDown; `short` cuts every fourth chunk body in half and drops the connection."""

    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    upstream = 0
    mode = "slow"
    counter = 0
    faults = 0

    def _fault(self) -> str | None:
        with self.lock:
            type(self).counter += 1
            n = self.counter
            fault = None
            if self.mode == "slow" and n % 3 == 0:
                fault = "slow"
            elif self.mode == "short" and self.command == "GET" and ".cacnk" in self.path and n % 4 == 0:
                fault = "short"
            if fault:
                type(self).faults += 1
            return fault

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = self._fault()
        if fault == "slow":
            text = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=HANG_GUARD)
        try:
            conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "short" and answer.status == 200:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("mode", ["slow", "short"])
def test_throttling_and_short_reads_are_retried(s3_server: S3Server, tmp_path: Path, mode: str):
    """Through a proxy that throttles (503 SlowDown on every third request) or cuts chunk bodies
    short: make and extract still complete, and the output is exact."""
    bucket = s3_server.bucket()
    data = blob(tmp_path / "blob", 9)
    store = f"s3+{s3_server.endpoint}/{bucket}"
    if mode == "short":  # the faults are in reading: fill the store directly
        assert s3_cli(s3_server, "make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob").returncode == 0
    handler = type("Proxy", (_FaultyProxy,), {"upstream": s3_server.port, "mode": mode})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        via = f"s3+http://127.0.0.1:{proxy.server_address[1]}/{bucket}"
        if mode == "slow":
            r = s3_cli(s3_server, "make", "-s", via, tmp_path / "i.caibx", tmp_path / "blob")
            assert r.returncode == 0, r.stderr
        r = s3_cli(s3_server, "extract", "-s", via, tmp_path / "i.caibx", tmp_path / "o")
        assert r.returncode == 0, r.stderr
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert (tmp_path / "o").read_bytes() == data
    assert handler.faults >= 2


def test_anonymous_reads_of_a_public_bucket(s3_server: S3Server, tmp_path: Path):
    """No S3_*, no AWS_*, no ~/.aws, no config: requests go unsigned. A bucket whose policy lets
    anyone read serves extract."""
    bucket = s3_server.bucket()
    data = blob(tmp_path / "blob", 10)
    store = f"s3+{s3_server.endpoint}/{bucket}"
    assert s3_cli(s3_server, "make", "-s", store, tmp_path / "i.caibx", tmp_path / "blob").returncode == 0
    public = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
                                                      "Action": "s3:GetObject",
                                                      "Resource": f"arn:aws:s3:::{bucket}/*"}]}
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(public))
    home = tmp_path / "home"
    home.mkdir()
    none = {"S3_ACCESS_KEY": "", "S3_SECRET_KEY": "", "AWS_CONFIG_FILE": str(home / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    r = s3_cli(s3_server, "extract", "-s", store, tmp_path / "i.caibx", tmp_path / "o", env=none, home=home)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o").read_bytes() == data


def test_location_parsing_addressing_and_regions():
    from pydesync.store.s3 import S3Location, gcs_location, region_of_host, s3_credentials_key

    where = S3Location("s3+https://s3.eu-west-1.amazonaws.com/bucket/a/b")
    assert (where.endpoint, where.bucket, where.prefix, where.addressing) == (
        "https://s3.eu-west-1.amazonaws.com", "bucket", "a/b/", "virtual")
    assert S3Location("s3+http://minio.lan:9000/b").addressing == "path"
    assert S3Location("s3+http://minio.lan:9000/b?lookup=dns").addressing == "virtual"
    assert S3Location("s3+https://x.amazonaws.com/b?lookup=path").addressing == "path"
    assert S3Location("s3+https://r2.example/b?region=auto").region == "auto"
    assert region_of_host("s3.eu-west-1.amazonaws.com") == "eu-west-1"
    assert region_of_host("s3-us-west-2.amazonaws.com") == "us-west-2"
    assert region_of_host("s3.amazonaws.com") is None and region_of_host("minio.lan") is None
    assert gcs_location("gs://bkt/some/prefix") == "s3+https://storage.googleapis.com/bkt/some/prefix?lookup=path"
    assert s3_credentials_key("s3+http://127.0.0.1:9000/b/p") == "http://127.0.0.1:9000"
    assert s3_credentials_key("gs://bkt/p") == "https://storage.googleapis.com"


def test_an_object_larger_than_allowed_is_refused_before_reading(s3_server: S3Server,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """The declared length decides: an object longer than the reader's limit is an error at once
    (as a 129 MiB object is for a chunk, and 4 GB for an index)."""
    from pydesync.errors import StoreError
    from pydesync.store import open_store

    bucket = s3_server.bucket()
    s3_server.client().put_object(Bucket=bucket, Key="big", Body=bytes(5000))
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3+{s3_server.endpoint}/{bucket}/")
    try:
        assert store.objects.read("big", limit=5000) == bytes(5000)
        with pytest.raises(StoreError, match="object of 5000 bytes, longer than 4999 bytes"):
            store.objects.read("big", limit=4999)
    finally:
        store.close()


@pytest.mark.parametrize("which", ["s3_server", "s3_auth_server"])
def test_chunk_requests_go_direct_and_signed(which: str, request: pytest.FixtureRequest, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    """GET, HEAD and PUT of chunks skip botocore's request machinery (signed by its SigV4 signer,
    sent over urllib3): the authenticating server accepts every one, none is handed back to boto3,
    and missing chunks are told apart from errors."""
    from pydesync.extract import extract
    from pydesync.make import chunk_stream
    from pydesync.store.s3 import S3Store

    server: S3Server = request.getfixturevalue(which)
    for name in [k for k in os.environ if k.startswith(("AWS_", "S3_"))]:
        monkeypatch.delenv(name)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    bucket = server.bucket()
    data = blob(tmp_path / "blob", 11, 1_200_000)
    store = S3Store(f"s3+{server.endpoint}/{bucket}/direct")
    try:
        with open(tmp_path / "blob", "rb") as f:
            index, stats = chunk_stream(f, store=store)
        assert stats.chunks_stored == len(set(c.id for c in index)) > 3
        assert all(store.has(c.id) for c in index)
        assert not store.has(ChunkId(bytes(32)))
        with pytest.raises(ChunkMissing):
            store.get(ChunkId(bytes(32)))
        extract(index, str(tmp_path / "out"), store)
        assert (tmp_path / "out").read_bytes() == data
        assert store.objects.direct is not None and store.objects.direct.fallbacks == 0
    finally:
        store.close()
