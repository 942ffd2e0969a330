"""The servers (chunk-server, index-server, sync-serve) against hostile and careless clients: real
server processes on 127.0.0.1, real sockets. A failure inside one connection ends that connection
only, with the status that fits; limits answer 503; running out of descriptors pauses accepting;
SIGTERM and SIGINT stop the server after the requests in flight; metrics, health and access logs
say what happened. Every case ends with the server still answering a good request.
"""

from __future__ import annotations

import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error, need, run_cli
from faultserver import Gate
from procutil import HANG_GUARD, exchange, stop

from pydesync.index import read_index


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of a few chunks, its index and the blob (read only)."""
    d = tmp_path_factory.mktemp("hardening")
    (d / "blob").write_bytes(random.Random(17).randbytes(1 << 20))
    r = run_cli("make", "-s", d / "store", d / "blob.caibx", d / "blob")
    assert r.returncode == 0, r.stderr
    return d


def chunk_path(made: Path) -> tuple[str, bytes]:
    """A chunk's request path and its stored bytes."""
    chunk = str(read_index(str(made / "blob.caibx")).chunks[0].id)
    stored = made / "store" / chunk[:4] / f"{chunk}.cacnk"
    return f"/{chunk[:4]}/{chunk}.cacnk", stored.read_bytes()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def get(port: int, path: str, headers: str = "") -> bytes:
    return exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())


def still_serving(proc: subprocess.Popen, port: int, made: Path, headers: str = "") -> None:
    """The server is alive and answers a good request with the chunk."""
    path, stored = chunk_path(made)
    answer = get(port, path, headers)
    assert status_of(answer) == 200 and answer.endswith(stored), answer[:200]
    assert proc.poll() is None


# ---- one bad request costs one connection ----------------------------------------------------------

HEADS = {
    "65,537 bytes of G": (b"G" * 65537, {400}),
    "a head without its end": (b"GET /x HTTP/1.1\r\nX-Long: " + b"a" * 70_000, {431}),
    "a 70 kB cookie": (b"GET /x HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 70_000 + b"\r\n\r\n", {431}),
    "too many headers": (b"GET /x HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", {431}),
    "a bad Content-Length": (b"PUT /x HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n", {400}),
    "Content-Length and chunked": (
        b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", {400}),
    "not HTTP": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(200), {400}),
}


@pytest.mark.parametrize("mode", ["read-only", "writable", "authorization", "proxy"])
def test_a_bad_head_costs_one_connection(made: Path, serve, fault, mode: str):
    """Each head that once stopped the server (a head over 64 KiB, a 70 kB cookie, ...) gets its
    status and a closed connection; the server goes on answering."""
    args: list[object] = ["-s", made / "store"]
    headers = ""
    if mode == "writable":
        args.append("-w")
    elif mode == "authorization":
        args += ["--authorization", "Bearer s3cret"]
        headers = "Authorization: Bearer s3cret\r\n"
    elif mode == "proxy":
        args = ["-s", fault(made / "store").url]
    proc, port, log = serve("chunk-server", *args)
    for name, (data, statuses) in HEADS.items():
        answer = exchange(port, data)
        assert status_of(answer) in statuses, (name, answer[:200])
        assert b"Connection: close" in answer, name
    still_serving(proc, port, made, headers)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("kind", ["index-server", "sync-serve"])
def test_other_servers_take_bad_heads_too(made: Path, serve, kind: str):
    proc, port, _ = serve(kind, *(["-s", made] if kind == "index-server" else [made / "blob"]))
    for name, (data, statuses) in HEADS.items():
        assert status_of(exchange(port, data)) in statuses, name
    path = "/blob.caibx" if kind == "index-server" else "/blob"
    assert status_of(get(port, path)) == 200 and proc.poll() is None


def test_the_client_takes_a_hostile_head(made: Path, fault, tmp_path: Path):
    """An HTTP store answering with a head over 64 KiB: one clear error, no output."""
    def huge_head(handler, path, count, body):
        handler.send_response(200)
        handler.send_header("X-Padding", "p" * 70_000)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return True

    server = fault(made / "store", huge_head)
    r = run_cli("extract", "-e", "0", "-s", server.url, made / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, "head too large")
    assert not (tmp_path / "out").exists()


# ---- limits ----------------------------------------------------------------------------------------

def no_descriptors_to_spare() -> None:
    """preexec_fn: 64 descriptors at most, hard limit included (the server cannot raise it)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_running_out_of_descriptors_pauses_accepting(made: Path, tmp_path: Path):
    """Far more connections than descriptors (the cap lifted): accept fails with EMFILE, the
    server says so once, answers the connections it has (503 while it cannot open a chunk file),
    and serves and accepts again once they close."""
    log = tmp_path / "server.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pydesync", "chunk-server", "-s", str(made / "store"), "-l", "127.0.0.1:0",
             "--max-connections", "100000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=no_descriptors_to_spare)
    try:
        port = wait_for_port(proc, log)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) for _ in range(200)]
        wait_for_line(proc, log, "cannot accept connections")
        path, stored = chunk_path(made)
        first = conns[0]  # accepted: the first ones were
        assert status_of(ask(first, path, stored)) in (200, 503)
        for conn in conns[1:]:
            conn.close()
        deadline = time.monotonic() + HANG_GUARD  # descriptors come back as the server sees the closes
        while status_of(answer := ask(first, path, stored)) == 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status_of(answer) == 200 and answer.endswith(stored)
        first.close()
        still_serving(proc, port, made)
        assert log.read_text().count("cannot accept connections") == 1
        assert "Traceback" not in log.read_text()
    finally:
        stop(proc)


def ask(conn: socket.socket, path: str, stored: bytes) -> bytes:
    """One GET on a kept-alive connection; the whole answer (its body as long as it says)."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def wait_for_port(proc: subprocess.Popen, log: Path) -> int:
    return int(wait_for_line(proc, log, r"serving .* at http://127\.0\.0\.1:(\d+)").group(1))


def wait_for_line(proc: subprocess.Popen, log: Path, pattern: str) -> re.Match:
    deadline = time.monotonic() + HANG_GUARD
    while True:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def until_answered(port: int, path: str, want: int = 200) -> bytes:
    """A request repeated until its status is `want` (a slot freed by a close is freed when the
    server has seen the close)."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        answer = get(port, path)
        if status_of(answer) == want or time.monotonic() > deadline:
            return answer
        time.sleep(0.02)


def test_connections_over_the_cap_get_503(made: Path, serve):
    proc, port, _ = serve("chunk-server", "-s", made / "store", "--max-connections", "5")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    path, _ = chunk_path(made)
    # the five are accepted in order; a sixth is answered 503 and closed
    for conn in idle:  # each accepted: it gets its answer
        conn.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        conn.settimeout(HANG_GUARD)
        assert status_of(conn.recv(4096)) == 200
    answer = get(port, path)
    assert status_of(answer) == 503 and b"too many connections" in answer and b"Retry-After" in answer
    for conn in idle:
        conn.close()
    assert status_of(until_answered(port, path)) == 200
    still_serving(proc, port, made)


def put_head(chunk: str, length: int) -> bytes:
    return (f"PUT /{chunk[:4]}/{chunk}.cacnk HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()


def test_uploads_over_the_cap_get_503_and_stalled_ones_hold_no_thread(made: Path, serve, tmp_path: Path):
    """Uploads that never finish their body hold no thread each (the loop receives bodies), the
    one past --max-uploads is answered 503, and when they go the server answers at once."""
    store = tmp_path / "upload"
    store.mkdir()
    proc, port, _ = serve("chunk-server", "-w", "-s", store, "--max-uploads", "200")
    chunk = str(read_index(str(made / "blob.caibx")).chunks[0].id)
    stalled = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)
        s.sendall(put_head(chunk, 1000) + b"0123456789")
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")  # admitted, counted as an upload
        stalled.append(s)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    assert threads < 50, threads  # a thread each would be 200 more
    answer = exchange(port, put_head(chunk, 1000))
    assert status_of(answer) == 503 and b"too many uploads" in answer
    for s in stalled:
        s.close()
    path, stored = chunk_path(made)
    head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(stored)}\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + HANG_GUARD
    while status_of(answer := exchange(port, head.encode() + stored)) == 503 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert status_of(answer) == 200, answer[:200]
    assert proc.poll() is None


def test_a_body_larger_than_allowed_is_413_before_it_is_sent(made: Path, serve, tmp_path: Path):
    (tmp_path / "s").mkdir()
    proc, port, _ = serve("chunk-server", "-w", "-s", tmp_path / "s")
    chunk = str(read_index(str(made / "blob.caibx")).chunks[0].id)
    answer = exchange(port, put_head(chunk, 1 << 40))
    assert status_of(answer) == 413
    still_serving_store = get(port, f"/{chunk[:4]}/{chunk}.cacnk")
    assert status_of(still_serving_store) == 404 and proc.poll() is None


# ---- stopping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_requests_in_flight(made: Path, serve, fault, sig: int):
    """A request in flight (its upstream holds it) when the signal comes: no new connections are
    taken, the request is answered in full, and the server exits 0 with one line saying so."""
    gate = Gate(allow=0)
    upstream = fault(made / "store", gate)
    proc, port, log = serve("chunk-server", "-s", upstream.url)
    path, stored = chunk_path(made)
    client = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    gate.wait_for_waiting(1)
    proc.send_signal(sig)
    deadline = time.monotonic() + HANG_GUARD
    while True:  # the listener closes once the server has seen the signal
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, "still accepting after the signal"
        time.sleep(0.02)
    gate.release()
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    assert status_of(answer) == 200 and answer.endswith(stored) and b"Connection: close" in answer
    assert proc.wait(HANG_GUARD) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines[-1] == f"chunk-server: stopped on {signal.Signals(sig).name} after 1 requests", lines
    assert "Error" not in log.read_text()


@pytest.mark.parametrize("kind", ["chunk-server", "index-server", "sync-serve"])
def test_an_idle_server_stops_on_sigterm_with_status_0(made: Path, serve, kind: str):
    args = {"chunk-server": ["-s", made / "store"], "index-server": ["-s", made],
            "sync-serve": [made / "blob"]}
    proc, _, log = serve(kind, *args[kind])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(HANG_GUARD) == 0
    assert log.read_text().splitlines()[-1] == f"{kind}: stopped on SIGTERM after 0 requests"


# ---- what operators see ------------------------------------------------------------------------------

def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    answer = exchange(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    return status_of(answer.replace(b"HTTP/1.0", b"HTTP/1.1", 1)), answer.split(b"\r\n\r\n", 1)[1].decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (all its labels given) in Prometheus's text format."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def metrics_port(proc: subprocess.Popen, log: Path) -> int:
    return int(wait_for_line(proc, log, r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))


def test_metrics_health_and_access_log_in_proxy_mode(made: Path, serve, fault, tmp_path: Path):
    need(__import__("importlib").util.find_spec("prometheus_client") is not None,
         "prometheus_client not installed (pip install 'pydesync[metrics]')")
    upstream = fault(made / "store")
    access = tmp_path / "access.log"
    proc, port, log = serve("chunk-server", "-s", upstream.url, "-c", tmp_path / "cache", "--log", access,
                            "--log-format", "common", "--metrics-listen", "127.0.0.1:0")
    mport = metrics_port(proc, log)
    path, stored = chunk_path(made)
    for _ in range(2):  # a miss, then a hit
        assert get(port, path).endswith(stored)
    assert status_of(get(port, "/0000/nope.cacnk")) == 400
    status, text = scrape(mport)
    assert status == 200
    requests = "pydesync_http_requests_total"
    assert metric(text, requests, server="chunk-server", method="GET", status="200") == 2
    assert metric(text, requests, server="chunk-server", method="GET", status="400") == 1
    assert metric(text, "pydesync_chunk_cache_lookups_total", result="miss") == 1
    assert metric(text, "pydesync_chunk_cache_lookups_total", result="hit") == 1
    assert metric(text, "pydesync_http_sent_bytes_total", server="chunk-server") >= 2 * len(stored)
    assert metric(text, "pydesync_http_received_bytes_total", server="chunk-server") > 0
    metric(text, "pydesync_http_connections", server="chunk-server")
    assert scrape(mport, "/health") == (200, "ok\n")
    lines = access.read_text().splitlines()
    clf = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                     r'"GET \S+ HTTP/1\.1" (\d{3}) (\d+|-)$')
    assert [clf.match(line).group(1) for line in lines] == ["200", "200", "400"], lines  # type: ignore[union-attr]
    assert int(clf.match(lines[0]).group(2)) == len(stored)  # type: ignore[union-attr]
    still_serving(proc, port, made)


def test_metrics_count_refused_uploads_and_other_servers(made: Path, serve, tmp_path: Path):
    need(__import__("importlib").util.find_spec("prometheus_client") is not None,
         "prometheus_client not installed (pip install 'pydesync[metrics]')")
    (tmp_path / "s").mkdir()
    proc, port, log = serve("chunk-server", "-w", "-s", tmp_path / "s", "--metrics-listen", "127.0.0.1:0")
    mport = metrics_port(proc, log)
    chunk = str(read_index(str(made / "blob.caibx")).chunks[0].id)
    wrong = b"\x28\xb5\x2f\xfd\x20\x05\x29\x00\x00hello"  # zstd of "hello": not this chunk
    head = (f"PUT /{chunk[:4]}/{chunk}.cacnk HTTP/1.1\r\nContent-Length: {len(wrong)}\r\n"
            "Connection: close\r\n\r\n")
    assert status_of(exchange(port, head.encode() + wrong)) == 400
    assert metric(scrape(mport)[1], "pydesync_chunk_uploads_rejected_total", server="chunk-server") == 1
    others = (("index-server", ["-s", made], "/blob.caibx"), ("sync-serve", [made / "blob"], "/blob"))
    for kind, args, path in others:
        other, oport, olog = serve(kind, *args, "--metrics-listen", "127.0.0.1:0")
        assert status_of(get(oport, path)) == 200
        text = scrape(metrics_port(other, olog))[1]
        assert metric(text, "pydesync_http_requests_total", server=kind, method="GET", status="200") == 1


def test_start_up_line_says_what_a_user_needs(made: Path, serve, tmp_path: Path):
    _, port, log = serve("chunk-server", "-s", made / "store", "--authorization", "x")
    line = log.read_text().splitlines()[0]
    assert line == (f"chunk-server: serving {made / 'store'} (read-only, Authorization required) at "
                    f"http://127.0.0.1:{port}")
    (tmp_path / "w").mkdir()
    _, port, log = serve("chunk-server", "-w", "-s", tmp_path / "w")
    assert log.read_text().splitlines()[0] == f"chunk-server: serving {tmp_path / 'w'} (read-write) at " \
                                              f"http://127.0.0.1:{port}"


# ---- timeouts (in process, with short limits) ---------------------------------------------------------

def test_silence_inside_a_body_is_408(monkeypatch):
    """A client that stops sending in the middle of a body is answered 408 and cut, once it has
    been silent for the head timeout (here 0.3 s); the server answers others meanwhile."""
    import threading

    from pydesync.server import http11

    monkeypatch.setattr(http11, "SWEEP", 0.05)
    service = http11.Service("test", lambda req: req._conn.reply(req, 200, b"ok"), quick=lambda req: True)
    server = http11.Http11Server([("127.0.0.1", 0)], service, limits=http11.Limits(head_timeout=0.3))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
            s.sendall(b"PUT /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert status_of(answer) == 408, answer
        assert exchange(port, b"GET /y HTTP/1.1\r\nConnection: close\r\n\r\n").endswith(b"ok")
    finally:
        server.shutdown()
        thread.join()


def test_a_client_that_pipelines_and_never_reads_holds_bounded_memory():
    """100 pipelined requests for 1 MiB answers, none read: the server answers until about
    HIGH_WATER waits to be sent, keeps the other requests unanswered, and goes on once the client
    reads; every answer arrives, in order."""
    import threading

    from pydesync.server import http11

    body = bytes(1 << 20)

    def handle(req):
        req._conn.reply(req, 200, req.target.encode().ljust(16) + body)

    service = http11.Service("test", handle, quick=lambda req: True)
    server = http11.Http11Server([("127.0.0.1", 0)], service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=HANG_GUARD) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(100)))
            deadline = time.monotonic() + HANG_GUARD
            while not (server.conns and next(iter(server.conns)).out_bytes >= http11.HIGH_WATER):
                assert time.monotonic() < deadline, "the server never backed up"
                time.sleep(0.01)
            conn = next(iter(server.conns))
            assert conn.out_bytes < http11.HIGH_WATER + len(body) + 4096 and conn.ready
            got = b""
            for i in range(100):
                while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 16 + len(body):
                    got += s.recv(1 << 20)
                head, rest = got.split(b"\r\n\r\n", 1)
                assert status_of(head) == 200 and rest[:16].rstrip() == b"/%d" % i
                got = rest[16 + len(body):]
    finally:
        server.shutdown()
        thread.join()
