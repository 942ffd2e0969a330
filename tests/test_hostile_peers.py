"""Hostile HTTP peers: a store or index server that declares or streams more than any chunk or index
can be, and malformed framing. The client must give one clear error, hold no more than the limit in
memory (the commands run under an address-space cap), and leave no output behind."""

from __future__ import annotations

import contextlib
import random
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Result, assert_clean_error, no_stray_files, run_cli
from procutil import HANG_GUARD

MEMORY_CAP = 2 << 30  # a body held whole past the limit (129 MiB) would need far more, per thread
Answer = Callable[[socket.socket], None]


def endless(sock: socket.socket, head: bytes, piece: bytes) -> None:
    """Send the head, then `piece` again and again until the client hangs up."""
    sock.sendall(head)
    with contextlib.suppress(OSError):
        while True:
            sock.sendall(piece)


ANSWERS: dict[str, Answer] = {
    # declares 10 GB and sends a little: refused from the declaration
    "declared": lambda s: s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n" + bytes(1000)),
    # chunked, one 1 MiB piece after another, forever
    "chunked": lambda s: endless(s, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                 b"100000\r\n" + bytes(1 << 20) + b"\r\n"),
    # one chunk whose size line claims 1 TB
    "chunk-size": lambda s: s.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"10000000000\r\n" + bytes(1000)),
    # no framing at all: the body would end when the server closes, which it never does
    "unframed": lambda s: endless(s, b"HTTP/1.0 200 OK\r\n\r\n", bytes(1 << 20)),
    # a superscript two is a digit to str.isdigit() but not to int()
    "bad-length": lambda s: s.sendall("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode("latin-1")),
    "bad-status": lambda s: s.sendall("HTTP/1.1 ²00 OK\r\nContent-Length: 0\r\n\r\n".encode("latin-1")),
    "bad-chunk-end": lambda s: s.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                         b"3\r\nabcXY0\r\n\r\n"),
}


@contextlib.contextmanager
def hostile_server(answer: Answer) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 giving every request the same hostile answer."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(HANG_GUARD)
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            answer(conn)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):  # until the client hangs up
                pass

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        done.set()
        thread.join(HANG_GUARD)
        listener.close()


def run_capped(*args: str | Path, memory: int = MEMORY_CAP) -> Result:
    """The command line under an address-space cap: holding a hostile body whole fails loudly."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    proc = subprocess.run([sys.executable, "-m", "pydesync", *map(str, args)], capture_output=True,
                          stdin=subprocess.DEVNULL, preexec_fn=cap, timeout=HANG_GUARD)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small blob's index (its chunks are what the hostile server is asked for)."""
    folder = tmp_path_factory.mktemp("made")
    (folder / "blob").write_bytes(random.Random(3).randbytes(300_000))
    r = run_cli("make", "-s", folder / "store", folder / "blob.caibx", folder / "blob")
    assert r.returncode == 0, r.stderr
    return folder


@pytest.mark.parametrize("kind", ["declared", "chunked", "chunk-size", "unframed"])
def test_extract_refuses_an_oversized_chunk_answer(kind: str, made: Path, tmp_path: Path):
    with hostile_server(ANSWERS[kind]) as url:
        r = run_capped("extract", "-s", url, "-e", "1", made / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, "longer than")
    assert no_stray_files(tmp_path, set()) == []


@pytest.mark.parametrize("kind", ["bad-length", "bad-status", "bad-chunk-end"])
def test_extract_names_malformed_http(kind: str, made: Path, tmp_path: Path):
    with hostile_server(ANSWERS[kind]) as url:
        r = run_capped("extract", "-s", url, "-e", "1", made / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, "malformed")
    assert no_stray_files(tmp_path, set()) == []


def test_an_index_declared_larger_than_any_index_is_refused(tmp_path: Path):
    """Indexes may be large (4 GB are allowed), but a declared 10 GB is refused before reading."""
    with hostile_server(ANSWERS["declared"]) as url:
        r = run_capped("extract", "-s", tmp_path / "store", url + "big.caibx", tmp_path / "out")
    assert_clean_error(r, "longer than")
    assert no_stray_files(tmp_path, set()) == []


def test_a_local_store_file_larger_than_any_chunk_is_refused(made: Path, tmp_path: Path):
    """A shared store holding a huge file under a chunk's name: an error naming it, not a read of it."""
    store = tmp_path / "store"
    subprocess.run(["cp", "-r", str(made / "store"), str(store)], check=True)
    victim = next(store.glob("*/*.cacnk"))
    with open(victim, "r+b") as f:
        f.truncate(200 << 20)  # sparse: costs no disk
    r = run_capped("extract", "-s", store, made / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, victim.name, "longer than any chunk")
    assert not (tmp_path / "out").exists()


def test_an_index_too_large_for_the_memory_limit_is_one_line(tmp_path: Path):
    """Under a memory limit (what SECURITY.md advises where indexes come from untrusted servers), an
    index too large to hold parsed ends in one line, not a traceback (nor the interpreter's own
    complaints while it shuts down short of memory), and leaves no output."""
    import os

    from pydesync.index import Index

    index = Index()
    ids = os.urandom(32 * 2_000_000)
    for i in range(2_000_000):
        index.append(ids[32 * i:32 * i + 32], 65536)
    (tmp_path / "huge.caibx").write_bytes(index.to_bytes())  # 80 MB, some 420 MB once parsed
    r = run_capped("extract", "-s", tmp_path / "store", tmp_path / "huge.caibx", tmp_path / "out",
                   memory=400 << 20)
    assert_clean_error(r, "out of memory")
    assert no_stray_files(tmp_path, {"huge.caibx", "store"}) == []
