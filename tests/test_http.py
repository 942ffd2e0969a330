"""HTTP stores and servers against real sockets on 127.0.0.1.

Servers under test run as `python -m pydesync chunk-server|index-server`
subprocesses on free ports; misbehaving upstreams (5xx, dropped connections,
silence, corrupt bodies) are small http.server instances in threads. Covers
desync's MANIFEST expectations for the servers (incl. TLS and mutual TLS),
casync's HTTP client against our chunk-server, retries and failover, the
server's input checks, `--store-file` reloads on SIGHUP, and HTTP stores as
cache and `make` targets. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import assert_clean_error, no_stray_files
from faultserver import FaultServer, answer
from procutil import HANG_GUARD, exchange, free_port, start_server, stop, wait_listening
from vectors import NULL_CHUNK_32K

from pydesync import LocalStore, parse_index
from pydesync.codec import compress, decompress

ZERO_ID = "0" * 64


# ---- helpers -----------------------------------------------------------------------------------

def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYDESYNC_REQUIRE_PEERS", None)
    env.pop("DESYNC_HTTP_AUTH", None)
    env["HOME"] = env.get("PYDESYNC_TEST_HOME", env.get("HOME", "/root"))
    env.update(extra or {})
    return env


class Server:
    """A pydesync server subprocess on a port of its own choosing; stderr goes to a file."""

    def __init__(self, kind: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.stderr_path = log_dir / f"{kind}-{len(list(log_dir.iterdir()))}.stderr"
        self.proc, self.port = start_server(kind, *args, stderr=self.stderr_path, env=server_env(env))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"https://localhost:{self.port}/"

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start pydesync servers for one test: serve("chunk-server", "-s", store, ...)."""
    started: list[Server] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(kind: str, *args: object, env: dict[str, str] | None = None) -> Server:
        server = Server(kind, [str(a) for a in args], log_dir, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def blob1_server(desync_cmd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A read-only chunk-server over desync's blob1.store, shared by the module."""
    server = Server("chunk-server", ["-s", str(desync_cmd / "blob1.store")], tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One raw request (the path is sent exactly as given, no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def chunk_path(chunk_id: str, suffix: str = ".cacnk") -> str:
    return f"/{chunk_id[:4]}/{chunk_id}{suffix}"


def store_ids(path: Path) -> set[str]:
    return {str(i) for i in LocalStore(path).ids()}


def index_ids(path: Path) -> list[str]:
    return [str(c.id) for c in parse_index(path.read_bytes())]


def write_config(path: Path, store_options: dict[str, dict]) -> Path:
    path.write_text(json.dumps({"store-options": store_options}))
    return path


def without_flags(index: bytes) -> bytes:
    """An index with its feature-flags word zeroed (`make` sets flags desync's fixture lacks)."""
    return index[:16] + bytes(8) + index[24:]


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def blob1(desync_cmd: Path) -> bytes:
    return (desync_cmd / "blob1").read_bytes()


@pytest.fixture(scope="module")
def first_chunk(desync_cmd: Path) -> str:
    return index_ids(desync_cmd / "blob1.caibx")[0]


# ---- in-test upstreams that misbehave -------------------------------------------------------------

# ---- casync interop --------------------------------------------------------------------------------

def test_client_against_static_http_server(cli, casync_data, casync_inputs, tmp_path):
    """Our HTTP store against `python -m http.server` holding a casync-made store."""
    shutil.copytree(casync_data / "blob.castr", tmp_path / "blob.castr")
    shutil.copy(casync_data / "blob.caibx", tmp_path / "blob.caibx")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_listening(proc, port)
        base = f"http://127.0.0.1:{port}"
        # -n 4: http.server's listen backlog is 5; more connections at once wait for SYN retries
        r = cli("extract", "-n", "4", "-s", f"{base}/blob.castr/", "blob.caibx", tmp_path / "out",
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == (casync_inputs / "blob.bin").read_bytes()
        # the index itself over HTTP too
        r = cli("extract", "-n", "4", "-s", f"{base}/blob.castr", f"{base}/blob.caibx", tmp_path / "out2")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out2").read_bytes() == (casync_inputs / "blob.bin").read_bytes()
    finally:
        stop(proc)


def test_casync_extracts_from_chunk_server(cli, casync, casync_inputs, serve, tmp_path):
    blob = casync_inputs / "blob.bin"
    r = cli("make", "-s", tmp_path / "store", tmp_path / "blob.caibx", blob)
    assert r.returncode == 0, r.stderr
    server = serve("chunk-server", "-s", tmp_path / "store", "--log", "-")
    out = tmp_path / "out.bin"
    proc = subprocess.run([casync, "extract", f"--store={server.url}", str(tmp_path / "blob.caibx"),
                           str(out)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == blob.read_bytes()
    assert "Request: GET /" in server.stderr and "Response: 200" in server.stderr


# ---- desync's chunk-server expectations ---------------------------------------------------------

def test_chunk_server_read_only(cli, desync_cmd, blob1_server, blob1, tmp_path):
    server = blob1_server
    r = cli("extract", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "blob").read_bytes() == blob1
    assert request(server.port, "GET", "/somefile")[0] == 400
    status, body = request(server.port, "GET", chunk_path(ZERO_ID))
    assert status == 404 and ZERO_ID.encode() in body
    assert request(server.port, "HEAD", chunk_path(ZERO_ID))[0] == 404
    assert request(server.port, "HEAD", chunk_path(index_ids(desync_cmd / "blob1.caibx")[0]))[0] == 200
    assert request(server.port, "DELETE", chunk_path(ZERO_ID))[0] == 405
    r = cli("chop", "-s", server.url, desync_cmd / "blob2.caibx", desync_cmd / "blob2")
    assert_clean_error(r, "writing to upstream")


def test_chunk_server_served_bytes_are_the_stored_files(desync_cmd, blob1_server):
    for chunk_id in index_ids(desync_cmd / "blob1.caibx")[:5]:
        status, body = request(blob1_server.port, "GET", chunk_path(chunk_id))
        assert status == 200
        assert body == (desync_cmd / "blob1.store" / chunk_id[:4] / f"{chunk_id}.cacnk").read_bytes()
        assert hashlib.new("sha512_256", decompress(body)).hexdigest() == chunk_id


def test_chunk_server_writable(cli, desync_cmd, blob1, serve, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    server = serve("chunk-server", "-s", store, "-w")
    r = cli("chop", "-s", server.url, desync_cmd / "blob1.caibx", desync_cmd / "blob1")
    assert r.returncode == 0, r.stderr
    assert store_ids(store) == set(index_ids(desync_cmd / "blob1.caibx"))
    assert request(server.port, "PUT", "/somefile", b"invalid")[0] == 400
    r = cli("extract", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1


def test_writable_needs_exactly_one_store(cli, desync_cmd, tmp_path):
    r = cli("chunk-server", "-w", "-s", desync_cmd / "blob1.store", "-s", desync_cmd / "blob2.store",
            "-l", f"127.0.0.1:{free_port()}")
    assert_clean_error(r, "Only one upstream store supported for writing and no cache")
    r = cli("chunk-server", "-w", "-s", tmp_path, "-c", tmp_path / "cache", "-l", f"127.0.0.1:{free_port()}")
    assert_clean_error(r, "Only one upstream store supported for writing and no cache")


# ---- desync's index-server expectations ----------------------------------------------------------

def test_index_server_read_only(cli, desync_cmd, serve):
    server = serve("index-server", "-s", desync_cmd)
    r = cli("list-chunks", f"{server.url}blob1.caibx")
    assert r.returncode == 0, r.stderr
    assert r.out.split() == index_ids(desync_cmd / "blob1.caibx")
    status, body = request(server.port, "GET", "/blob1.caibx")
    assert status == 200 and body == (desync_cmd / "blob1.caibx").read_bytes()
    assert request(server.port, "GET", "/blob1")[0] == 400
    assert request(server.port, "HEAD", "/blob1.caibx")[0] == 200
    assert request(server.port, "HEAD", "/does-not-exist.caibx")[0] == 404
    assert request(server.port, "GET", "/does-not-exist.caibx")[0] == 404
    r = cli("make", f"{server.url}new.caibx", desync_cmd / "blob1")
    assert_clean_error(r, "writing to upstream")
    assert not (desync_cmd / "new.caibx").exists()


def test_index_server_writable(cli, desync_cmd, serve, tmp_path):
    store = tmp_path / "indexes"
    store.mkdir()
    server = serve("index-server", "-s", store, "-w")
    r = cli("make", "-m", "2:8:32", f"{server.url}new.caibx", desync_cmd / "blob1")
    assert r.returncode == 0, r.stderr
    expected = without_flags((desync_cmd / "blob1.caibx").read_bytes())
    assert without_flags((store / "new.caibx").read_bytes()) == expected
    status, _ = request(server.port, "PUT", "/invalid.caibx", b"invalid")
    assert status == 415
    valid = (desync_cmd / "blob1.caibx").read_bytes()
    status, _ = request(server.port, "PUT", "/..%5C..%5Cevil.caibx", valid)
    assert status == 400
    assert all_files(tmp_path) == {"indexes", "indexes/new.caibx"}


# ---- TLS ------------------------------------------------------------------------------------------

def test_tls_chunk_server(cli, desync_cmd, blob1, serve, tmp_path):
    server = serve("chunk-server", "-s", desync_cmd / "blob1.store",
                   "--key", desync_cmd / "server.key", "--cert", desync_cmd / "server.crt")
    index = desync_cmd / "blob1.caibx"
    r = cli("extract", "--ca-cert", desync_cmd / "ca.crt", "-s", server.tls_url, index, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a").read_bytes() == blob1
    r = cli("extract", "-t", "-s", server.tls_url, index, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b").read_bytes() == blob1
    r = cli("extract", "-e", "1", "-s", server.tls_url, index, tmp_path / "c")
    assert_clean_error(r, "CERTIFICATE_VERIFY_FAILED")
    assert not (tmp_path / "c").exists()


def test_mutual_tls_chunk_server(cli, desync_cmd, blob1, serve, tmp_path):
    server = serve("chunk-server", "-s", desync_cmd / "blob1.store",
                   "--key", desync_cmd / "server.key", "--cert", desync_cmd / "server.crt",
                   "--mutual-tls", "--client-ca", desync_cmd / "ca.crt")
    index = desync_cmd / "blob1.caibx"
    r = cli("extract", "--client-key", desync_cmd / "client.key", "--client-cert", desync_cmd / "client.crt",
            "--ca-cert", desync_cmd / "ca.crt", "-s", server.tls_url, index, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a").read_bytes() == blob1
    r = cli("extract", "-e", "1", "--ca-cert", desync_cmd / "ca.crt", "-s", server.tls_url, index,
            tmp_path / "b")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()
    r = cli("extract", "--client-key", desync_cmd / "client.key", "--ca-cert", desync_cmd / "ca.crt",
            "-s", server.tls_url, index, tmp_path / "c")
    assert_clean_error(r, "--client-cert")


def test_tls_index_server(cli, desync_cmd, serve):
    server = serve("index-server", "-s", desync_cmd,
                   "--key", desync_cmd / "server.key", "--cert", desync_cmd / "server.crt",
                   "--mutual-tls", "--client-ca", desync_cmd / "ca.crt")
    r = cli("list-chunks", "--client-key", desync_cmd / "client.key",
            "--client-cert", desync_cmd / "client.crt", "--ca-cert", desync_cmd / "ca.crt",
            f"{server.tls_url}blob1.caibx")
    assert r.returncode == 0, r.stderr
    assert len(r.out.split()) == 161
    r = cli("list-chunks", "-e", "1", "--ca-cert", desync_cmd / "ca.crt", f"{server.tls_url}blob1.caibx")
    assert r.returncode != 0 and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--key", "server.key"], "--key and --cert"),
    (["--key", "server.key", "--cert", "server.crt", "--mutual-tls"], "--client-ca"),
    (["--mutual-tls", "--client-ca", "ca.crt"], "--mutual-tls requires"),
    (["--key", "server.key", "--cert", "server.crt", "--client-ca", "ca.crt"],
     "--client-ca requires --mutual-tls"),
])
def test_tls_flag_validation(cli, desync_cmd, flags, message):
    r = cli("chunk-server", "-s", desync_cmd / "blob1.store", *flags, "-l", f"127.0.0.1:{free_port()}",
            cwd=desync_cmd)
    assert_clean_error(r, message)


# ---- failover, retries and faults ---------------------------------------------------------------

def test_failover_from_always_500(cli, desync_cmd, blob1, fault, tmp_path):
    broken = fault(None, lambda h, path, count, body: answer(h, 500, b"broken\n"))
    r = cli("extract", "-b", "10ms", "-s", f"{broken.url}|{desync_cmd / 'blob1.store'}",
            desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1
    assert broken.requests, "the failing member was never asked"


def test_retries_5xx_then_succeeds(cli, desync_cmd, blob1, first_chunk, fault, tmp_path):
    """Two 500s, then the chunk: three attempts, the waits between them desync's backoff (500 ms,
    then twice that). The waits are measured between the attempts' arrivals at the server, which
    the client's sleeps separate whatever the load: lower bounds only."""
    target = chunk_path(first_chunk)
    arrivals: list[float] = []

    def flaky(handler, path, count, body):
        if path != target:
            return False
        arrivals.append(time.monotonic())
        return count <= 2 and answer(handler, 500)

    server = fault(desync_cmd / "blob1.store", flaky)
    r = cli("extract", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1
    assert server.counts[target] == 3
    assert arrivals[1] - arrivals[0] >= 0.5 and arrivals[2] - arrivals[1] >= 1.0, arrivals


def test_retries_exhausted_names_status(cli, desync_cmd, first_chunk, fault, tmp_path):
    target = chunk_path(first_chunk)
    server = fault(desync_cmd / "blob1.store", lambda h, path, count, body: path == target and answer(h, 503))
    r = cli("extract", "-e", "1", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert_clean_error(r, "503", first_chunk)
    assert server.counts[target] == 1
    assert not (tmp_path / "out").exists()


def test_connection_dropped_mid_response(cli, desync_cmd, first_chunk, fault, tmp_path):
    target = chunk_path(first_chunk)

    def drop(handler, path, count, body):
        if path != target:
            return False
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:100])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)
        handler.close_connection = True
        return True

    server = fault(desync_cmd / "blob1.store", drop)
    (tmp_path / "out").write_bytes(b"old")
    r = cli("extract", "-b", "10ms", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert_clean_error(r, first_chunk[:4])
    assert server.counts[target] == 3
    assert (tmp_path / "out").read_bytes() == b"old"
    assert no_stray_files(tmp_path, {"out"}) == []


def drip(handler, path, count, body):
    """Headers at once, then a byte at a time without end: each read is quick, the answer never
    completes (the client stops reading once its own timeout has passed)."""
    if body is None:
        return False
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) + (64 << 20)))  # under the client's cap
    handler.end_headers()
    with contextlib.suppress(OSError):
        while True:
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)
    return True


@pytest.mark.parametrize("kind", ["silent", "drip"])
def test_slow_server_times_out(cli, desync_cmd, fault, tmp_path, kind):
    """`timeout` (store-options, nanoseconds) bounds a whole request, retries included: against a
    server that never answers, or never finishes an answer, extract ends with "timed out"."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # never accepts: connections complete, requests are never answered
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        if kind == "drip":
            url = fault(desync_cmd / "blob1.store", drip).url
        config = write_config(tmp_path / "config.json", {url: {"timeout": 1_000_000_000}})
        r = cli("--config", config, "extract", "-e", "2", "-b", "10ms", "-s", url,
                desync_cmd / "blob1.caibx", tmp_path / "out")
    finally:
        silent.close()
    assert_clean_error(r, "timed out")
    assert not (tmp_path / "out").exists()


def corrupt_server(fault: Callable[..., FaultServer], store: Path, chunk: str, body: bytes) -> FaultServer:
    target = chunk_path(chunk)
    return fault(store, lambda h, path, count, _body: path == target and answer(h, 200, body))


@pytest.mark.parametrize("garbage, message", [
    (b"not zstd at all", "invalid chunk"),
    (compress(b"some other data"), "does not match its hash"),
], ids=["undecodable", "wrong-data"])
def test_corrupt_chunk_is_an_error_naming_it(cli, desync_cmd, first_chunk, fault, tmp_path, garbage, message):
    server = corrupt_server(fault, desync_cmd / "blob1.store", first_chunk, garbage)
    r = cli("extract", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert_clean_error(r, first_chunk, message)
    assert not (tmp_path / "out").exists()
    # a chain does not paper over a store that answers wrongly (only "missing" falls through) ...
    r = cli("extract", "-s", server.url, "-s", desync_cmd / "blob1.store", desync_cmd / "blob1.caibx",
            tmp_path / "out")
    assert_clean_error(r, first_chunk)
    assert not (tmp_path / "out").exists()


def test_corrupt_chunk_fails_over_to_a_good_member(cli, desync_cmd, blob1, first_chunk, fault, tmp_path):
    server = corrupt_server(fault, desync_cmd / "blob1.store", first_chunk, b"garbage")
    r = cli("extract", "-s", f"{server.url}|{desync_cmd / 'blob1.store'}", desync_cmd / "blob1.caibx",
            tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1


def test_missing_on_http_falls_through_to_next_store(cli, desync_cmd, blob1, fault, tmp_path):
    empty = fault(desync_cmd / "empty.store")
    r = cli("extract", "-s", empty.url, "-s", desync_cmd / "blob1.store", desync_cmd / "blob1.caibx",
            tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1
    r = cli("extract", "-s", empty.url, desync_cmd / "blob1.caibx", tmp_path / "out2")
    assert_clean_error(r, "missing")
    assert not (tmp_path / "out2").exists()


def test_unframed_responses(cli, desync_cmd, blob1, fault, tmp_path):
    """HTTP/1.0 answers without Content-Length: the body ends when the server closes."""
    def unframed(handler, path, count, body):
        if body is None:
            return False
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = True
        return True

    server = fault(desync_cmd / "blob1.store", unframed)
    r = cli("extract", "-n", "4", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1


# ---- server input checks ------------------------------------------------------------------------------

TRAVERSALS = [
    "/../secret.cacnk",
    "/../../../../etc/passwd",
    "/%2e%2e/secret.cacnk",
    "/%2e%2e%2fsecret.cacnk",
    "/..%5Csecret.cacnk",
    "/..%5C..%5Csecret.caibx",
    "/%2E%2E/%2E%2E/secret.caibx",
    "/0000/../../secret.caibx",
    "/..",
]


@pytest.fixture
def jail(desync_cmd: Path, tmp_path: Path) -> Path:
    """tmp_path/store (an empty store dir) next to secrets that must stay out of reach."""
    (tmp_path / "store").mkdir()
    (tmp_path / "secret.cacnk").write_bytes(b"secret")
    shutil.copy(desync_cmd / "blob1.caibx", tmp_path / "secret.caibx")
    return tmp_path


def test_chunk_server_rejects_traversal(serve, jail, desync_cmd):
    before = all_files(jail)
    server = serve("chunk-server", "-s", jail / "store", "-w")
    valid = compress((desync_cmd / "blob1").read_bytes()[:100])
    for path in TRAVERSALS:
        for method, body in (("GET", None), ("HEAD", None), ("PUT", valid)):
            status, answer_body = request(server.port, method, path, body)
            assert status == 400, (method, path, status)
            assert b"secret" not in answer_body
    assert all_files(jail) == before


def test_index_server_rejects_traversal(serve, jail, desync_cmd):
    before = all_files(jail)
    server = serve("index-server", "-s", jail / "store", "-w")
    valid = (desync_cmd / "blob1.caibx").read_bytes()
    for path in TRAVERSALS:
        for method, body in (("GET", None), ("HEAD", None), ("PUT", valid)):
            status, _ = request(server.port, method, path, body)
            assert status == 400, (method, path, status)
    assert all_files(jail) == before


def test_put_needs_writable(blob1_server, desync_cmd, first_chunk):
    body = (desync_cmd / "blob1.store" / first_chunk[:4] / f"{first_chunk}.cacnk").read_bytes()
    status, text = request(blob1_server.port, "PUT", chunk_path(first_chunk), body)
    assert status == 400
    assert b"writing to upstream chunk store is not enabled" in text


def test_put_with_wrong_hash_is_not_stored(serve, tmp_path, desync_cmd, first_chunk):
    store = tmp_path / "store"
    store.mkdir()
    server = serve("chunk-server", "-s", store, "-w")
    wrong = compress(b"these bytes do not hash to the name")
    assert request(server.port, "PUT", chunk_path(first_chunk), wrong)[0] == 400
    assert request(server.port, "PUT", chunk_path(first_chunk), b"not zstd")[0] == 400
    assert all_files(store) == set()
    good = (desync_cmd / "blob1.store" / first_chunk[:4] / f"{first_chunk}.cacnk").read_bytes()
    assert request(server.port, "PUT", chunk_path(first_chunk), good)[0] == 200
    assert store_ids(store) == {first_chunk}


def test_oversized_upload_is_413(serve, tmp_path, first_chunk):
    (tmp_path / "chunks").mkdir()
    (tmp_path / "indexes").mkdir()
    chunks = serve("chunk-server", "-s", tmp_path / "chunks", "-w")
    indexes = serve("index-server", "-s", tmp_path / "indexes", "-w")
    for port, path in ((chunks.port, chunk_path(first_chunk)), (indexes.port, "/huge.caibx")):
        head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {1 << 40}\r\n\r\n").encode()
        reply = exchange(port, head + b"short body")
        assert status_of(reply) == 413, reply[:200]
    assert all_files(tmp_path) == {"chunks", "indexes"}


def test_request_targets(blob1_server, desync_cmd, first_chunk):
    """Absolute form (as proxies send) is served; "//" and a stray "[" (which urlsplit takes for a
    host, or refuses) are a 400, not a handler's 500. Found by the httpserver fuzz target."""
    expected = (desync_cmd / "blob1.store" / first_chunk[:4] / f"{first_chunk}.cacnk").read_bytes()
    absolute = f"GET http://127.0.0.1{chunk_path(first_chunk)}?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n"
    reply = exchange(blob1_server.port, absolute.encode())
    assert status_of(reply) == 200 and reply.endswith(expected)
    for target in (f"/{chunk_path(first_chunk)}", "//b43b.ca[nd", "http://[x/a", "*"):
        head = f"HEAD {target} HTTP/1.1\r\nConnection: close\r\n\r\n"
        assert status_of(exchange(blob1_server.port, head.encode())) == 400, target


def test_keep_alive_and_unread_bodies(blob1_server, desync_cmd, first_chunk):
    expected = (desync_cmd / "blob1.store" / first_chunk[:4] / f"{first_chunk}.cacnk").read_bytes()
    get = f"GET {chunk_path(first_chunk)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    last = get.replace(b"Host: x", b"Host: x\r\nConnection: close")
    reply = exchange(blob1_server.port, get + last)  # pipelined on one connection
    assert reply.count(b"HTTP/1.1 200 ") == 2 and reply.count(expected) == 2
    # a body the handler does not read is still taken as the body, never as the next request
    body = b"GET /x HTTP/1.1\r\n\r\n"
    with_body = f"GET {chunk_path(first_chunk)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    reply = exchange(blob1_server.port, with_body.encode() + body + last)
    assert reply.count(b"HTTP/1.1 ") == 2 and reply.count(expected) == 2 and b"HTTP/1.1 400" not in reply


@contextlib.contextmanager
def in_process(handle: Callable, quick: bool = False, limits: object = None) -> Iterator[int]:
    """The server core in a thread of this process, on a free port; yields the port."""
    from pydesync.server.http11 import Http11Server, Service

    service = Service("test", handle, quick=lambda req: quick)
    server = Http11Server([("127.0.0.1", 0)], service, limits=limits)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.parametrize("loop", [False, True], ids=["worker", "event-loop"])
def test_handler_bug_is_a_500_not_a_dropped_connection(loop):
    calls = []

    def app(req):
        calls.append(req.target)
        if req.target == "/boom":
            raise RuntimeError("bug")
        req._conn.reply(req, 200, b"ok")

    with in_process(app, quick=loop) as port:
        assert request(port, "GET", "/boom")[0] == 500
        assert request(port, "GET", "/fine") == (200, b"ok")
    assert calls == ["/boom", "/fine"]


def test_event_loop_connection_moves_to_a_thread_for_an_upload(serve, desync_cmd, first_chunk, tmp_path):
    """GETs from a local store are answered on the event loop; a PUT on the same connection moves
    it to a thread, and the answers still come in order."""
    store = tmp_path / "store"
    shutil.copytree(desync_cmd / "blob1.store", store)
    stored = store / first_chunk[:4] / f"{first_chunk}.cacnk"
    body = stored.read_bytes()
    stored.unlink()
    other = next(p for p in store.rglob("*.cacnk"))
    server = serve("chunk-server", "-w", "-s", store)
    get = f"GET /{other.parent.name}/{other.name} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    put = (f"PUT {chunk_path(first_chunk)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
           .encode() + body)
    last = get.replace(b"Host: x", b"Host: x\r\nConnection: close")
    reply = exchange(server.port, get + put + last)
    assert [status_of(b"HTTP/1.1" + r) for r in reply.split(b"HTTP/1.1")[1:] if r[:1] == b" "] == [200] * 3
    assert reply.count(other.read_bytes()) == 2
    assert stored.read_bytes() == body


def test_client_that_does_not_read_does_not_stall_others(blob1_server, desync_cmd, first_chunk):
    """One client pipelines thousands of GETs and reads nothing: its answers wait in its own queue
    while the event loop goes on answering another client."""
    get = f"GET {chunk_path(first_chunk)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", blob1_server.port)) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):  # the server stops reading once its answers back up
            while sent < len(get) * 3000:
                sent += stuck.send(get)
        # while `stuck` is still open and unread, another client is answered
        status, data = request(blob1_server.port, "GET", chunk_path(first_chunk))
        assert status == 200 and data == (desync_cmd / "blob1.store" / first_chunk[:4]
                                          / f"{first_chunk}.cacnk").read_bytes()


@pytest.mark.parametrize("via_env", [False, True])
def test_authorization(cli, desync_cmd, blob1, serve, tmp_path, via_env):
    secret = "Bearer s3cret"
    args = [] if via_env else ["--authorization", secret]
    env = {"DESYNC_HTTP_AUTH": secret} if via_env else None
    chunks = serve("chunk-server", "-s", desync_cmd / "blob1.store", *args, env=env)
    indexes = serve("index-server", "-s", desync_cmd, *args, env=env)
    chunk = chunk_path(index_ids(desync_cmd / "blob1.caibx")[0])
    for port, path in ((chunks.port, chunk), (indexes.port, "/blob1.caibx")):
        assert request(port, "GET", path)[0] == 401
        assert request(port, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(port, "GET", path, headers={"Authorization": secret})[0] == 200
    r = cli("extract", "-e", "1", "-s", chunks.url, desync_cmd / "blob1.caibx", tmp_path / "no")
    assert_clean_error(r, "401")
    config = write_config(tmp_path / "config.json", {chunks.url: {"http-auth": secret},
                                                     indexes.url: {"http-auth": secret}})
    r = cli("--config", config, "extract", "-s", chunks.url, f"{indexes.url}blob1.caibx", tmp_path / "yes")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "yes").read_bytes() == blob1


def test_uncompressed_server_converts(cli, desync_cmd, blob1, serve, tmp_path, first_chunk):
    server = serve("chunk-server", "-u", "-s", desync_cmd / "blob1.store")
    status, body = request(server.port, "GET", chunk_path(first_chunk, ""))
    assert status == 200
    assert hashlib.new("sha512_256", body).hexdigest() == first_chunk
    assert request(server.port, "HEAD", chunk_path(first_chunk, ""))[0] == 200
    status, text = request(server.port, "GET", chunk_path(first_chunk))
    assert status == 400 and b"verify compression and encryption settings" in text
    config = write_config(tmp_path / "config.json", {server.url: {"uncompressed": True}})
    r = cli("--config", config, "extract", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1


def test_uncompressed_server_accepts_uncompressed_puts(cli, desync_cmd, blob1, serve, tmp_path, first_chunk):
    store = tmp_path / "store"
    store.mkdir()
    server = serve("chunk-server", "-u", "-w", "-s", store)
    raw = decompress((desync_cmd / "blob1.store" / first_chunk[:4] / f"{first_chunk}.cacnk").read_bytes())
    assert request(server.port, "PUT", chunk_path(first_chunk, ""), raw)[0] == 200
    assert (store / first_chunk[:4] / f"{first_chunk}.cacnk").is_file()  # kept in the store's own format
    assert request(server.port, "PUT", chunk_path(first_chunk, ""), raw[:-1] + b"x")[0] == 400
    config = write_config(tmp_path / "config.json", {server.url: {"uncompressed": True}})
    r = cli("--config", config, "chop", "-s", server.url, desync_cmd / "blob1.caibx", desync_cmd / "blob1")
    assert r.returncode == 0, r.stderr
    assert store_ids(store) == set(index_ids(desync_cmd / "blob1.caibx"))
    r = cli("extract", "-s", store, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1


# ---- HTTP stores as write targets -----------------------------------------------------------------

def test_http_store_as_cache(cli, desync_cmd, blob1, serve, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    server = serve("chunk-server", "-s", cache, "-w")
    r = cli("extract", "-s", desync_cmd / "blob1.store", "-c", server.url, desync_cmd / "blob1.caibx",
            tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a").read_bytes() == blob1
    # every chunk but the all-zero one, which extract writes without asking any store
    assert store_ids(cache) == set(index_ids(desync_cmd / "blob1.caibx")) - {NULL_CHUNK_32K}
    # now the cache alone serves everything
    r = cli("extract", "-s", desync_cmd / "empty.store", "-c", server.url, desync_cmd / "blob1.caibx",
            tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b").read_bytes() == blob1
    # a read-only server cannot be a cache
    ro = serve("chunk-server", "-s", desync_cmd / "empty.store")
    r = cli("extract", "-e", "1", "-s", desync_cmd / "blob1.store", "-c", ro.url, desync_cmd / "blob1.caibx",
            tmp_path / "c")
    assert_clean_error(r, "writing to upstream")
    assert not (tmp_path / "c").exists()


def test_make_uploads_to_http_stores(cli, desync_cmd, blob1, serve, tmp_path):
    (tmp_path / "chunks").mkdir()
    (tmp_path / "indexes").mkdir()
    chunks = serve("chunk-server", "-s", tmp_path / "chunks", "-w")
    indexes = serve("index-server", "-s", tmp_path / "indexes", "-w")
    r = cli("make", "-m", "2:8:32", "-s", chunks.url, f"{indexes.url}blob1.caibx", desync_cmd / "blob1")
    assert r.returncode == 0, r.stderr
    made = (tmp_path / "indexes" / "blob1.caibx").read_bytes()
    assert without_flags(made) == without_flags((desync_cmd / "blob1.caibx").read_bytes())
    assert store_ids(tmp_path / "chunks") == set(index_ids(desync_cmd / "blob1.caibx"))
    r = cli("extract", "-s", chunks.url, f"{indexes.url}blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1


# ---- --store-file and SIGHUP ------------------------------------------------------------------------

def reloads(server: Server) -> int:
    """How many SIGHUPs the server has acted on: each ends in one line, a reload or a failure."""
    return len(re.findall(r"^(chunk-server: reloaded |failed to reload configuration)", server.stderr, re.M))


def reload_with(server: Server, store_file: Path, content: str) -> None:
    """Write the store file, send SIGHUP, and wait until the server has acted on it."""
    before = reloads(server)
    store_file.write_text(content)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + HANG_GUARD
    while reloads(server) == before:
        assert server.proc.poll() is None and time.monotonic() < deadline, server.stderr
        time.sleep(0.02)


def test_store_file_reloads_on_sighup(cli, desync_cmd, blob1, serve, tmp_path, first_chunk):
    blob2_only = next(i for i in index_ids(desync_cmd / "blob2.caibx")
                      if i not in set(index_ids(desync_cmd / "blob1.caibx")))
    store_file = tmp_path / "stores.json"
    store_file.write_text(json.dumps({"stores": [str(desync_cmd / "empty.store")]}))
    server = serve("chunk-server", "--store-file", store_file)
    assert request(server.port, "GET", chunk_path(first_chunk))[0] == 404

    # a failover group and a cache, from the file
    cache = tmp_path / "cache"
    group = f"{desync_cmd / 'blob1.store'}|{desync_cmd / 'empty.store'}"
    reload_with(server, store_file, json.dumps({"stores": [group, str(desync_cmd / "blob2.store")],
                                                "cache": str(cache)}))
    assert request(server.port, "GET", chunk_path(first_chunk))[0] == 200
    assert request(server.port, "GET", chunk_path(blob2_only))[0] == 200
    assert first_chunk in store_ids(cache)
    r = cli("extract", "-s", server.url, desync_cmd / "blob1.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == blob1

    # an invalid file keeps the old stores
    for bad in ("{not json", json.dumps({"stores": [str(tmp_path / "does-not-exist")]}), json.dumps({})):
        errors_before = server.stderr.count("failed to reload configuration")
        reload_with(server, store_file, bad)
        assert server.stderr.count("failed to reload configuration") == errors_before + 1, server.stderr
        assert request(server.port, "GET", chunk_path(first_chunk))[0] == 200
    assert server.proc.poll() is None

    # back to a valid one: swapped again
    reload_with(server, store_file, json.dumps({"stores": [str(desync_cmd / "blob2.store")]}))
    assert request(server.port, "GET", chunk_path(first_chunk))[0] == 404  # not in blob2
    assert request(server.port, "GET", chunk_path(blob2_only))[0] == 200


def test_store_file_writable(cli, desync_cmd, serve, tmp_path, first_chunk):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    store_file = tmp_path / "stores.json"
    store_file.write_text(json.dumps({"stores": [str(a)]}))
    server = serve("chunk-server", "-w", "--store-file", store_file)
    good = (desync_cmd / "blob1.store" / first_chunk[:4] / f"{first_chunk}.cacnk").read_bytes()
    assert request(server.port, "PUT", chunk_path(first_chunk), good)[0] == 200
    assert store_ids(a) == {first_chunk}
    reload_with(server, store_file, json.dumps({"stores": [str(b)]}))
    assert request(server.port, "HEAD", chunk_path(first_chunk))[0] == 404
    assert request(server.port, "PUT", chunk_path(first_chunk), good)[0] == 200
    assert store_ids(b) == {first_chunk}
    # writable mode: still one store and no cache, checked on reload too
    reload_with(server, store_file, json.dumps({"stores": [str(a), str(b)]}))
    assert "Only one upstream store" in server.stderr


def test_store_file_flag_conflicts(cli, desync_cmd, tmp_path):
    store_file = tmp_path / "stores.json"
    store_file.write_text(json.dumps({"stores": [str(desync_cmd / "blob1.store")]}))
    listen = ["-l", f"127.0.0.1:{free_port()}"]
    r = cli("chunk-server", "--store-file", store_file, "-s", desync_cmd / "blob1.store", *listen)
    assert_clean_error(r, "--store and --store-file can't be used together")
    r = cli("chunk-server", "--store-file", store_file, "-c", tmp_path / "cache", *listen)
    assert_clean_error(r, "--cache and --store-file can't be used together")
    r = cli("chunk-server", "--store-file", tmp_path / "nope.json", *listen)
    assert_clean_error(r, "failed to read store-file")
    store_file.write_text(json.dumps({"stores": []}))
    r = cli("chunk-server", "--store-file", store_file, *listen)
    assert_clean_error(r, "no store provided")


def test_swap_store_retires_the_old_store_after_its_last_request():
    from pydesync import ChunkId
    from pydesync.errors import UsageError
    from pydesync.store.base import Store
    from pydesync.store.swap import SwapStore

    class Fake(Store):
        def __init__(self, name: str, writable: bool = True):
            self.location = name
            self.closed = threading.Event()
            self._writable = writable

        def get(self, chunk_id, digest=None):
            return self.location.encode()

        def has(self, chunk_id):
            return True

        @property
        def writable(self):
            return self._writable

        def close(self):
            self.closed.set()

    a, b = Fake("a"), Fake("b")
    swap = SwapStore(a)
    with swap.borrow() as store:
        assert store is a
        swap.swap(b)  # does not wait for the request still running on `a`
        assert swap.get(ChunkId(ZERO_ID)) == b"b" and swap.location == "b"
        assert not a.closed.wait(0.2)
    assert a.closed.wait(HANG_GUARD)
    assert not b.closed.is_set()
    writable = SwapStore(Fake("w"), require_writable=True)
    read_only = Fake("r", writable=False)
    with pytest.raises(UsageError, match="writable"):
        writable.swap(read_only)
    assert writable.location == "w" and read_only.closed.is_set()


def test_event_loop_cuts_a_slow_drip_head(monkeypatch):
    """A client sending its request head a byte at a time, each within the idle limit, is cut once
    the head has taken longer than the head limit in all (slowloris). The idle limit is set out of
    reach, so the head limit is the only rule that can close the connection: the drip goes on
    until it does."""
    from pydesync.server import http11

    monkeypatch.setattr(http11, "SWEEP", 0.1)
    limits = http11.Limits(head_timeout=0.5, idle_timeout=1e9)
    with in_process(lambda req: req._conn.reply(req, 200, b"ok"), quick=True, limits=limits) as port, \
            socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nX-Drip: ")
        deadline = time.monotonic() + HANG_GUARD
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                s.sendall(b"a")
            except OSError:
                break
            closed = bool(select.select([s], [], [], 0.05)[0])  # readable: answered and closed
        assert time.monotonic() < deadline, "the slow head was never cut"
        with contextlib.suppress(ConnectionResetError):
            answer = s.recv(4096)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
