"""Attacks on the server core (http11) that an earlier version did not withstand: real server
processes on 127.0.0.1 (a few in process, where only a short timeout makes a case testable).
Each test states what a correct server does; none asserts on elapsed time (HANG_GUARD only turns
a hang into a failure).
"""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import need, run_cli
from procutil import HANG_GUARD, exchange, stop

from pydesync.index import read_index


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of a few chunks, its index (also in idx/) and the blob (read only)."""
    d = tmp_path_factory.mktemp("attacks")
    (d / "blob").write_bytes(random.Random(23).randbytes(1 << 20))
    r = run_cli("make", "-s", d / "store", d / "blob.caibx", d / "blob")
    assert r.returncode == 0, r.stderr
    (d / "idx").mkdir()
    shutil.copy(d / "blob.caibx", d / "idx" / "blob.caibx")
    return d


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    need(shutil.which("openssl") is not None, "openssl not installed")
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "2", "-keyout", d / "key.pem", "-out", d / "cert.pem"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def chunk_of(made: Path) -> tuple[str, str, bytes]:
    """A chunk's id, request path and stored bytes."""
    chunk = str(read_index(str(made / "blob.caibx")).chunks[0].id)
    return chunk, f"/{chunk[:4]}/{chunk}.cacnk", (made / "store" / chunk[:4] / f"{chunk}.cacnk").read_bytes()


def statuses(answer: bytes) -> list[int]:
    """The statuses of the answers in a stream of them (bodies may contain anything, but ours here
    do not contain 'HTTP/1.1 ' followed by three digits)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def first_status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def put(path: str, body: bytes, extra: str = "Connection: close\r\n") -> bytes:
    return f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def until_not_503(port: int, data: bytes) -> bytes:
    """A request repeated while it is answered 503 (a slot is freed once the server has seen a close)."""
    deadline = time.monotonic() + HANG_GUARD
    while first_status(answer := exchange(port, data)) == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    return answer


def wishlist_post(port: int, path: str) -> bytes:
    """A POST asking for nothing (a wishlist of zero bits) for the file or index at `path`."""
    info = json.loads(exchange(port, f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
                      .split(b"\r\n\r\n", 1)[1])
    positions = len(info["Chunks"]) + len(info["Perm"]) - 1
    wish = bytes((positions + 7) // 8)
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(wish)}\r\nConnection: close\r\n\r\n"
            .encode() + wish)


# ---- a reset after a refused request kills the server ----------------------------------------------

@pytest.mark.parametrize("kind", ["chunk-server", "index-server", "sync-serve", "chunk-server-tls"])
def test_a_refused_request_then_a_reset_does_not_stop_the_server(made: Path, serve, cert, kind: str):
    """A bad head followed at once by a RST: the 400 cannot be sent. `_refuse` (called from the
    `except Refused` clause of `_event`, and from `_sweep`) flushes outside any handler, so the
    ConnectionResetError (SSLEOFError with TLS) left the loop and the process exited 1 after a
    few dozen tries."""
    args: dict[str, list[object]] = {
        "chunk-server": ["-s", made / "store"], "index-server": ["-s", made / "idx"],
        "sync-serve": [made / "blob"],
        "chunk-server-tls": ["-s", made / "store", "--cert", cert[0], "--key", cert[1]]}
    proc, port, log = serve(kind.removesuffix("-tls"), *args[kind])
    context = None
    if kind.endswith("-tls"):
        import ssl
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    for _ in range(500):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        try:
            s.settimeout(HANG_GUARD)
            s.connect(("127.0.0.1", port))
            if context is not None:
                s = context.wrap_socket(s)
            s.sendall(b"\x01\r\n\r\n")
        except OSError:
            pass
        finally:
            s.close()
        if proc.poll() is not None:
            break
    assert proc.poll() is None, log.read_text()
    assert "failed" not in log.read_text()


def test_expect_100_then_a_reset_logs_no_internal_error(made: Path, serve, tmp_path: Path):
    """The 100 Continue is sent from inside the parser's callback; a reset client made it an
    HttpParserCallbackError, logged as 'internal error on a connection' (a client can flood the log)."""
    (tmp_path / "w").mkdir()
    _proc, port, log = serve("chunk-server", "-w", "-s", tmp_path / "w")
    _, path, _ = chunk_of(made)
    head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode()
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(head)
    _, _, stored = chunk_of(made)
    assert first_status(until_not_503(port, put(path, stored))) == 200
    assert "internal error" not in log.read_text(), log.read_text()[-500:]


# ---- upload slots that are never given back ------------------------------------------------------

def test_an_upgrade_request_with_a_body_leaks_no_upload_slot(made: Path, serve, tmp_path: Path):
    """llhttp completes an Upgrade request without its body and pauses; the request (counted as an
    upload, its declared length too) is in conn.ready when `_refuse` clears ready without releasing
    it. Two such requests took both slots of --max-uploads 2 for good; at the default 1 GiB of
    upload bytes, eight with Content-Length 135 MB (never sent) refuse most uploads."""
    (tmp_path / "w").mkdir()
    _proc, port, _ = serve("chunk-server", "-w", "-s", tmp_path / "w", "--max-uploads", "2")
    chunk, path, stored = chunk_of(made)
    for _ in range(3):
        answer = exchange(port, f"PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
                                f"Content-Length: 1\r\n\r\nx".encode())
        assert first_status(answer) == 400, answer[:200]
    answer = until_not_503(port, put(path, stored))
    assert first_status(answer) == 200, answer[:200]
    assert (tmp_path / "w" / chunk[:4] / f"{chunk}.cacnk").exists()


def test_stray_bytes_after_an_upload_leak_no_upload_slot(made: Path, serve, tmp_path: Path):
    """A PUT sent in full, then bytes that are not a request (a client sending more than it
    declared): the PUT sits in conn.ready, the next head is refused, and `_refuse` clears ready
    without releasing the PUT's slot."""
    (tmp_path / "w").mkdir()
    _proc, port, _ = serve("chunk-server", "-w", "-s", tmp_path / "w", "--max-uploads", "2")
    _, path, stored = chunk_of(made)
    for _ in range(3):
        exchange(port, put(path, stored, extra="") + b"\x01garbage\r\n\r\n")
    answer = until_not_503(port, put(path, stored))
    assert first_status(answer) == 200, answer[:200]


def test_requests_before_a_streaming_post_leak_no_upload_slot(made: Path, serve):
    """sync-serve: a PUT (405, counted as an upload) pipelined before a POST; the connection is
    handed to the POST's thread with the PUT still in conn.ready, never released."""
    _proc, port, _ = serve("sync-serve", made / "blob", "--max-uploads", "2")
    post = wishlist_post(port, "/blob")
    for _ in range(2):
        exchange(port, b"PUT /blob HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx" + post)
    answer = until_not_503(port, post)
    assert first_status(answer) == 200, answer[:200]


@pytest.mark.parametrize("kind", ["sync-serve", "chunk-server"])
def test_bytes_after_a_streaming_post_do_not_wedge_the_connection(made: Path, serve, kind: str):
    """A POST that streams (sync-serve, chunk-server /sync/) with one more byte in the same read:
    llhttp refuses data after `Connection: close`, `_refuse` finds the connection busy (admit set
    it for the hand-over) and returns; the hand-over never happens, busy is never cleared, the
    sweep skips busy connections. The connection was never answered nor closed (even after the
    client closed its side: CLOSE-WAIT for ever), its descriptor and upload slot were never
    given back, and SIGTERM waited the full 30 s grace for it."""
    if kind == "sync-serve":
        proc, port, _log = serve(kind, made / "blob", "--max-uploads", "1")
        post = wishlist_post(port, "/blob")
    else:
        proc, port, _log = serve(kind, "-s", made / "store", "--sync-index-store", made / "idx",
                                "--max-uploads", "1")
        post = wishlist_post(port, "/sync/blob.caibx")
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(post + b"X")
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):  # the server must end the connection (a hang here is the bug)
            pass
    answer = until_not_503(port, post)
    assert first_status(answer) == 200, answer[:200]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(HANG_GUARD) == 0


# ---- answers for the wrong request ---------------------------------------------------------------

@pytest.mark.parametrize("second", ["after Connection: close", "HTTP/1.0 first", "413", "bad head",
                                    "upgrade"])
def test_requests_received_in_full_are_answered_before_a_later_one_is_refused(made: Path, serve, second):
    """Pipelined: a GET received in full, then a request that is refused (or, after a request that
    ends the connection, any byte at all). `_refuse` cleared conn.ready, so the GET was never
    answered and the client read the refusal as the GET's answer."""
    _proc, port, _ = serve("chunk-server", "-s", made / "store")
    _, path, stored = chunk_of(made)
    get = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    data = {
        "after Connection: close": get.replace(b"Host: x", b"Host: x\r\nConnection: close") + get,
        "HTTP/1.0 first": get.replace(b"HTTP/1.1", b"HTTP/1.0") + get,
        "413": get + f"PUT {path} HTTP/1.1\r\nContent-Length: {1 << 40}\r\n\r\n".encode(),
        "bad head": get + b"GET /x HTTP/1.1\r\nX: \x01\r\n\r\n",
        "upgrade": get + b"GET /x HTTP/1.1\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    }[second]
    answer = exchange(port, data)
    assert first_status(answer) == 200, answer[:200]
    _head, _, rest = answer.partition(b"\r\n\r\n")
    assert rest.startswith(stored)


def test_a_streaming_post_is_answered_after_the_requests_before_it(made: Path, serve):
    """sync-serve: GET then POST on one connection in one write. The connection was handed to the
    POST's thread with the GET still in conn.ready: the GET was never answered and the client read
    the POST's stream as the GET's answer."""
    _proc, port, _ = serve("sync-serve", made / "blob", "--perm-size", "1")
    post = wishlist_post(port, "/blob")
    answer = exchange(port, b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n" + post)
    assert first_status(answer) == 200
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert b"application/json" in head, answer[:300]  # the GET's SyncInfo first


def test_absolute_form_post_to_sync_is_not_an_internal_error(made: Path, serve):
    """chunk-server --sync-index-store: `streams()` looks at the raw target ("/sync/" prefix), the
    dispatcher at its path; `POST http://host/sync/x` went to a worker and reply_stream raised
    RuntimeError: 500 and 'internal error' in the log."""
    _proc, port, log = serve("chunk-server", "-s", made / "store", "--sync-index-store", made / "idx")
    post = wishlist_post(port, "/sync/blob.caibx")
    answer = exchange(port, post.replace(b"POST /sync/", b"POST http://127.0.0.1/sync/", 1))
    assert first_status(answer) in (200, 400), answer[:200]
    assert "internal error" not in log.read_text(), log.read_text()


def test_100_continue_comes_after_the_answers_to_earlier_requests(made: Path, serve, tmp_path: Path):
    """A GET and a PUT with `Expect: 100-continue` pipelined: the interim 100 was sent at once,
    before the GET's answer (which a pipelining client then takes for the GET's interim answer)."""
    (tmp_path / "w").mkdir()
    _proc, port, _ = serve("chunk-server", "-w", "-s", tmp_path / "w")
    _, path, stored = chunk_of(made)
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                  + f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(stored)}\r\n"
                    f"Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        got = b""
        while got.count(b"HTTP/1.1 ") < 2:
            got += s.recv(65536)
        s.sendall(stored)
        while data := s.recv(65536):
            got += data
    assert statuses(got) == [404, 100, 200], got[:300]


def test_an_h2c_upgrade_offer_is_answered_over_http11(made: Path, serve):
    """`curl --http2 http://...` offers `Upgrade: h2c`; a server may ignore an upgrade offer (RFC 9110
    7.8) and the old server did; llhttp pauses at it, and each such request was a 400."""
    _proc, port, _ = serve("chunk-server", "-s", made / "store")
    _, path, stored = chunk_of(made)
    answer = exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                            f"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
                            f"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode())
    assert first_status(answer) == 200 and answer.endswith(stored), answer[:200]


def test_a_small_head_split_across_reads_after_pipelined_requests_is_not_431(made: Path, serve):
    """count_head counts every byte of a read in which a head is left incomplete, the requests
    before it included: 60 kB of pipelined HEADs, then a 6 kB head arriving in two more reads
    came to more than 64 KiB and was refused 431."""
    _proc, port, _ = serve("chunk-server", "-s", made / "store")
    _, path, _ = chunk_of(made)
    head = f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    last = f"HEAD {path} HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 6000}\r\nConnection: close\r\n\r\n".encode()
    n = 60000 // len(head)
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(head * n + last[:10])
        got = b""
        while got.count(b"HTTP/1.1 ") < n:  # the server has read the first part
            got += s.recv(65536)
        s.sendall(last[10:5700])
        time.sleep(0.2)  # lets the server read this part on its own (not an assertion on time)
        s.sendall(last[5700:])
        while data := s.recv(65536):
            got += data
    assert statuses(got) == [200] * (n + 1), statuses(got)[-3:]


# ---- memory a client can make the server hold -------------------------------------------------------

def test_a_trailer_without_end_is_refused(made: Path, serve, tmp_path: Path):
    """A chunked upload's trailer section is not counted against MAX_HEAD (count_head only runs while
    the head is pending) and httptools accumulates a header value with `+=`: a trailer line that
    never ends grew the server's memory without bound (200 MiB sent, 200 MiB held, quadratic copying
    on the loop). A correct server refuses it (431/400) after about MAX_HEAD."""
    (tmp_path / "w").mkdir()
    proc, port, _ = serve("chunk-server", "-w", "-s", tmp_path / "w")
    _, path, _ = chunk_of(made)
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ".encode())
        try:
            for _ in range(8):
                s.sendall(b"a" * (1 << 20))
        except OSError:
            pass  # refused and closed: what should happen
        answer = b""
        try:
            while data := s.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    assert first_status(answer) in (400, 431), answer[:200]  # not 408, 30 s later
    assert proc.poll() is None


def vm(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
               .group(1)) << 10  # type: ignore[union-attr]


def test_small_chunks_do_not_multiply_an_uploads_memory(made: Path, serve, tmp_path: Path):
    """A chunked body is kept as a list of the pieces llhttp hands over, one bytes object per
    chunk: 2-byte chunks cost about 56 bytes of memory per 2 bytes counted against the limits
    (8 MiB of body: 225 MiB; a 129 MiB chunk upload: 3.6 GiB; the 1 GiB upload_bytes cap: 28 GiB)."""
    (tmp_path / "w").mkdir()
    proc, port, _ = serve("chunk-server", "-w", "-s", tmp_path / "w")
    _, path, _ = chunk_of(made)
    before = vm(proc.pid, "VmHWM")
    payload = 8 << 20
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  .encode())
        piece = b"2\r\nab\r\n" * (1 << 16)
        for _ in range(payload // (2 << 16)):
            s.sendall(piece)
        s.sendall(b"0\r\n\r\n")
        answer = b""
        while data := s.recv(65536):
            answer += data
    assert first_status(answer) == 400  # not a chunk; what matters is the memory it took
    grown = vm(proc.pid, "VmHWM") - before
    assert grown < 8 * payload, f"peak RSS grew {grown >> 20} MiB for {payload >> 20} MiB of body"


def no_descriptors_to_spare() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_idle_metrics_connections_do_not_stop_the_server(made: Path, tmp_path: Path):
    """--metrics-listen is a wsgiref ThreadingMixIn server without a timeout or a cap: each idle
    connection holds a thread and a descriptor for ever. With the descriptors gone the chunk server
    cannot accept ('cannot accept connections ... 0 open'), and without a descriptor limit every
    connection is one more thread."""
    need(__import__("importlib").util.find_spec("prometheus_client") is not None, "no prometheus_client")
    log = tmp_path / "server.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pydesync", "chunk-server", "-s", str(made / "store"), "-l", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=no_descriptors_to_spare)
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not re.search(r"serving .* at http://", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        text = log.read_text()
        port = int(re.search(r"serving .* at http://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        mport = int(re.search(r"metrics at http://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        for _ in range(300):
            try:
                held.append(socket.create_connection(("127.0.0.1", mport), timeout=5))
            except OSError:
                break
        _, path, _stored = chunk_of(made)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:  # 60 s: a hang guard
            s.sendall(f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while data := s.recv(65536):
                answer += data
        assert first_status(answer) in (200, 503), answer[:200]
        assert "cannot accept connections" not in log.read_text()
    finally:
        for s in held:
            s.close()
        stop(proc)


# ---- timeouts that blame the client for the server's own back-pressure (in process) ----------------

def in_process(handle, limits, monkeypatch):
    from pydesync.server import http11

    monkeypatch.setattr(http11, "SWEEP", 0.05)
    service = http11.Service("test", handle, quick=lambda req: True)
    server = http11.Http11Server([("127.0.0.1", 0)], service, limits=limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def test_heads_the_server_has_not_read_yet_are_not_timed_out(monkeypatch):
    """A client pipelines 300 requests (300 kB) at once and reads its answers steadily. The server
    reads the first 64 KiB (the last head in it incomplete), its answers back up past HIGH_WATER,
    so it stops reading; `_sweep` then measured the head timeout from when the head began and the
    last byte *read*, and answered 408 (twice: req_since is not reset by _refuse) though the
    client had sent every head at once. The rest of the pipelined requests were dropped and the
    close with unread input reset the connection. (head_timeout 1 s here; 30 s in the servers,
    where a client reading 1 MB/s behind 60 MB of pipelined answers meets the same.)"""
    from pydesync.server import http11

    body = bytes(64 << 10)
    server, thread = in_process(lambda req: req._conn.reply(req, 200, body),
                                http11.Limits(head_timeout=3.0), monkeypatch)
    try:
        n = 300
        with socket.create_connection(server.server_address, timeout=HANG_GUARD) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (i, b"p" * 900)
                               for i in range(n)) + b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
            got = b""
            try:
                while data := s.recv(65536):
                    got += data
                    time.sleep(0.02)  # a steady reader, slower than the server (not an assertion)
            except ConnectionResetError:
                pass
        assert statuses(got) == [200] * (n + 1), (len(statuses(got)), set(statuses(got)))
    finally:
        server.shutdown()
        thread.join()


def test_a_reader_taking_bytes_counts_as_progress_though_the_socket_stays_unwritable():
    """The unread-answer timeout runs from the last send() that made progress. With a large kernel
    send buffer (tcp_wmem autotuning reaches 4 MiB) the socket becomes writable again only when
    about a third of it has drained, which for a slow reader can take longer than the timeout
    although it reads all along: the sweep asks the kernel (SIOCOUTQ) whether the client took
    bytes since the last look. Here: a send queue filled up, nothing read (no progress), then
    some read (progress, as soon as the kernel has moved the bytes)."""
    from pydesync.server import http11

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # fixed: no window autotuning
        client.connect(listener.getsockname())
        server_side, _ = listener.accept()
        with client, server_side:
            server_side.setblocking(False)
            try:
                while True:
                    server_side.send(bytes(1 << 16))
            except BlockingIOError:
                pass
            conn = http11.Connection.__new__(http11.Connection)
            conn.sock = server_side
            conn.unsent = -1
            assert not http11._reading_progressed(conn)  # the first look: nothing to compare with
            assert conn.unsent > 0
            assert not http11._reading_progressed(conn)  # nothing read
            client.settimeout(HANG_GUARD)
            taken = 0
            deadline = time.monotonic() + HANG_GUARD  # a hang guard, not a bound on time
            while not http11._reading_progressed(conn):
                assert time.monotonic() < deadline, "reading never counted as progress"
                taken += len(client.recv(1 << 16))
            assert taken > 0
