#!/usr/bin/env python3
"""Bounded fuzzing of pydesync's parsers of untrusted input.

    python3 fuzz/fuzz_parsers.py                       # every target, 30 s each
    python3 fuzz/fuzz_parsers.py --target catar --seconds 300
    python3 fuzz/fuzz_parsers.py --engine atheris --seconds 600   # coverage-guided (pip install atheris)
    python3 fuzz/fuzz_parsers.py --replay fuzz/crashes  # rerun saved crashes

Targets, each fed bytes that a hostile peer controls:
- `index`: .caibx/.caidx parsing;
- `catar`: the archive decoder, payloads read;
- `protocol`: casync's pull server (`pydesync pull`) fed a client's stream;
- `push`: casync's push server (`pydesync push`) fed a client's stream (index, chunks, archive);
- `session`: our casync pull client (the ssh store) fed a server's stream, chunks decoded and checked;
- `remotesync`: SyncInfo JSON and binary, the receiver's data stream, the sender's wishlist;
- `chunk`: chunk decoding (zstd with and without a content size, xz, gzip), whose output must
  never exceed what the zstd block walk allowed;
- `httpserver`: the chunk-server's HTTP/1.1 core and handlers fed a client's byte stream;
- `httpclient`: the HTTP store client fed a server's answers.

Two engines. `mutate` (the default, no dependencies) mutates seeds: bit flips, bytes set to
boundary values, 64-bit fields set to extremes, cuts, insertions, duplicated slices. `atheris`
runs libFuzzer's coverage-guided search over instrumented pydesync code, one process per target,
keeping what it learns in fuzz/corpus/<target>/ for the next campaign. Seeds are valid inputs
(casync's vectors and transcripts from ../shared when present, and inputs built here).

A case passes when it parses or raises the target's documented error (a PydesyncError; OSError
for the HTTP client, whose callers turn it into one). It fails on any other exception, on taking
longer than 5 s (a hang) or on exceeding its memory (1 GiB address space with `mutate`, 2 GiB of
RSS with atheris). Failing inputs are written to fuzz/crashes/<target>-<hash>.bin with the
problem beside them; tests/test_fuzz_regressions.py replays everything saved there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
# pydesync is imported inside functions, so that the atheris engine can instrument it on import.

SHARED = HERE.parent.parent / "shared" / "testdata" / "casync"
CASE_SECONDS = 5
MEMORY = 1 << 30
EXTREMES = [0, 1, 15, 16, 17, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1]


class Hang(Exception):
    pass


# ---- seeds -----------------------------------------------------------------------------------------
def index_seeds() -> list[bytes]:
    from pydesync.index import Index

    found = [p.read_bytes() for p in sorted(SHARED.glob("*.ca?dx"))] if SHARED.is_dir() else []
    index = Index()
    rng = random.Random(1)
    for _ in range(20):
        index.append(rng.randbytes(32), rng.randrange(1, 70000))
    return [*found, index.to_bytes(), Index().to_bytes()]


def catar_seeds() -> list[bytes]:
    found = [p.read_bytes() for p in sorted(SHARED.glob("*.catar"))] if SHARED.is_dir() else []
    if found:
        return found
    from pydesync.archive import tar_to_file
    from pydesync.catar import format as F

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "t"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f").write_bytes(b"x" * 3000)
        (root / "a").write_text("hello")
        os.symlink("a", root / "link")
        tar_to_file(str(root), str(Path(d) / "t.catar"), F.WITH_BEST)
        return [(Path(d) / "t.catar").read_bytes()]


def protocol_seeds() -> list[bytes]:
    folder = SHARED / "protocol"
    found = [p.read_bytes() for p in sorted(folder.glob("*.c2s.bin"))] if folder.is_dir() else []
    from pydesync.protocol import GOODBYE, HELLO, PULL_CHUNKS, REQUEST, encode

    request = encode(REQUEST, struct.pack("<Q", 0) + bytes(32) * 3)
    return [*found, encode(HELLO, struct.pack("<Q", PULL_CHUNKS)) + request + encode(GOODBYE)]


def push_seeds() -> list[bytes]:
    folder = SHARED / "protocol"
    found = [p.read_bytes() for p in sorted(folder.glob("push-*.c2s.bin"))] if folder.is_dir() else []
    from pydesync.chunker import DEFAULT_SIZES
    from pydesync.digest import digest_of
    from pydesync.index import Index, blob_flags
    from pydesync.protocol import (
        CHUNK,
        GOODBYE,
        HELLO,
        INDEX,
        INDEX_EOF,
        PUSH_CHUNKS,
        PUSH_INDEX,
        PUSH_INDEX_CHUNKS,
        encode,
    )

    data = b"pushed chunk"
    chunk_id = digest_of(data)
    index = Index(flags=blob_flags(), sizes=DEFAULT_SIZES)
    index.append(chunk_id, len(data))
    hello = encode(HELLO, struct.pack("<Q", PUSH_INDEX | PUSH_CHUNKS | PUSH_INDEX_CHUNKS))
    chunk = encode(CHUNK, struct.pack("<Q", 0) + bytes(chunk_id) + data)
    return [*found, hello + encode(INDEX, index.to_bytes()) + encode(INDEX_EOF) + chunk,
            encode(HELLO, struct.pack("<Q", PUSH_CHUNKS)) + chunk + encode(GOODBYE)]


def remotesync_seeds() -> list[bytes]:
    from pydesync.remotesync import ChunkInfo, SyncInfo

    rng = random.Random(2)
    datas = [rng.randbytes(rng.randrange(0, 500)) for _ in range(12)]
    info = SyncInfo([ChunkInfo(hashlib.sha256(d).digest(), len(d)) for d in datas], [2, 0, 1])
    return [info.to_json(), SyncInfo(info.chunks).to_binary()]


def session_seeds() -> list[bytes]:
    """Servers' answers: casync's own transcripts, and one built here with CHUNK and MISSING."""
    from pydesync.codec import compress
    from pydesync.protocol import CHUNK, CHUNK_COMPRESSED, HELLO, MISSING, READABLE_STORE, encode

    folder = SHARED / "protocol"
    found = [p.read_bytes() for p in sorted(folder.glob("pull-*.s2c.bin"))] if folder.is_dir() else []
    built = encode(HELLO, struct.pack("<Q", READABLE_STORE))
    for i, data in enumerate(SESSION_DATA):
        key = hashlib.new("sha512_256", data).digest()
        built += encode(CHUNK, struct.pack("<Q", CHUNK_COMPRESSED) + key + compress(data)) if i % 2 == 0 \
            else encode(CHUNK, struct.pack("<Q", 0) + key + data)
    return [*found, built + encode(MISSING, bytes(32))]


SESSION_DATA = [random.Random(n).randbytes(200 + 300 * n) for n in range(3)]


def session_ids(seeds: list[bytes]) -> list[bytes]:
    """The ids the session target asks for: every id the input answers (harness code: a lenient scan)."""
    from pydesync.protocol import CHUNK, MISSING

    ids = []
    for seed in seeds:
        at = 0
        while at + 16 <= len(seed):
            size, kind = struct.unpack_from("<QQ", seed, at)
            if kind == CHUNK:
                ids.append(seed[at + 24:at + 56])
            elif kind == MISSING:
                ids.append(seed[at + 16:at + 48])
            at += max(size, 16)
    return list(dict.fromkeys(ids))


def chunk_seeds() -> list[bytes]:
    import zstandard

    from pydesync.codec import compress

    data = b"pydesync chunk " * 3000 + random.Random(4).randbytes(3000)
    streaming = []
    for checksum in (False, True):
        cctx = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=checksum)
        obj = cctx.compressobj()
        streaming.append(obj.compress(data) + obj.flush())
    rle = b"\x28\xb5\x2f\xfd\x00\x38" + b"".join(
        (8192 << 3 | 1 << 1 | (i == 2)).to_bytes(3, "little") + b"A" for i in range(3))
    return [compress(data), *streaming, compress(data, "xz"), compress(data, "gzip"), rle]


def httpserver_seeds() -> list[bytes]:
    """Requests a chunk-server answers: GET, HEAD, PUT (valid, with Expect, chunked), odd paths."""
    from pydesync.codec import compress

    data = b"chunk served over http " * 100
    key = hashlib.new("sha512_256", data).hexdigest()
    path = f"/{key[:4]}/{key}.cacnk"
    body = compress(data)
    return [
        f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\nHEAD {path} HTTP/1.1\r\n\r\n".encode(),
        f"PUT {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode() + body
        + f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode(),
        f"PUT {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
        b"GET /sync/x.caibx HTTP/1.1\r\n\r\nDELETE / HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]


def httpclient_seeds() -> list[bytes]:
    """Answers a store client reads: framed by length, chunked with trailers, unframed, interim."""
    return [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nbody until the end",
    ]


# ---- targets: each parses one input and may only raise its documented errors -------------------------
def run_index(data: bytes) -> None:
    from pydesync.index import parse_index

    parse_index(data, "fuzz")


def run_catar(data: bytes) -> None:
    from pydesync.catar.decoder import ArchiveDecoder

    for item in ArchiveDecoder(io.BytesIO(data), "fuzz"):
        payload = getattr(item, "payload", None)
        if payload is not None and item.is_file:
            for _ in payload():
                pass


def run_protocol(data: bytes) -> None:
    from pydesync.protocol import Channel, PullServer
    from pydesync.store.local import LocalStore

    with tempfile.TemporaryDirectory() as d:
        store = LocalStore(d, create=True)
        PullServer(Channel(io.BytesIO(data), io.BytesIO(), "fuzz"), store).serve()


def run_push(data: bytes) -> None:
    from pydesync.protocol import Channel, PushServer
    from pydesync.store.local import LocalStore

    with tempfile.TemporaryDirectory() as d:
        store = LocalStore(os.path.join(d, "store"), create=True)
        PushServer(Channel(io.BytesIO(data), io.BytesIO(), "fuzz"), store, [store],
                   os.path.join(d, "x.caibx"), os.path.join(d, "x.catar")).serve()


def run_remotesync(data: bytes) -> None:
    from pydesync.errors import PydesyncError
    from pydesync.remotesync import SyncInfo, receive, send, wishlist, wishlist_size

    for parse in (SyncInfo.from_json, SyncInfo.from_binary):
        with contextlib.suppress(PydesyncError):
            parse(data)
    rng = random.Random(len(data))
    datas = [rng.randbytes(rng.randrange(0, 300)) for _ in range(8)]
    from pydesync.remotesync import ChunkInfo

    info = SyncInfo([ChunkInfo(hashlib.sha256(x).digest(), len(x)) for x in datas], [1, 2, 0])
    wish = b"".join(wishlist(info, lambda key: False))
    receive(info, wish, io.BytesIO(data), lambda c, d: None)  # data as a hostile sender's stream
    send(info, data[: wishlist_size(info.positions) + 1], lambda c: b"", lambda b: None)  # as a wishlist


class ServerAfterRequests(io.BytesIO):
    """A server's stream that gives its first message (HELLO) at once and the rest only after the
    client's first REQUEST, as a real server would: answers never race ahead of the questions."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.hello_end = 16 + struct.unpack_from("<Q", data)[0] if len(data) >= 16 else len(data)
        self.size = len(data)
        self.asked = threading.Event()

    def read(self, n: int | None = -1) -> bytes:
        if self.hello_end <= self.tell() < self.size:
            self.asked.wait(5)
        return super().read(n)


class ClientWrites(io.BytesIO):
    def __init__(self, server: ServerAfterRequests):
        super().__init__()
        self.server = server

    def write(self, data: bytes) -> int:  # type: ignore[override]
        from pydesync.protocol import REQUEST

        if len(data) >= 16 and struct.unpack_from("<Q", data, 8)[0] == REQUEST:
            self.server.asked.set()
        return super().write(data)


def run_session(data: bytes) -> None:
    from pydesync.digest import ChunkId
    from pydesync.protocol import Channel, PullSession, decode_payload
    from pydesync.store.base import verify_chunk

    server = ServerAfterRequests(data)
    try:
        session = PullSession(Channel(server, ClientWrites(server), "fuzz"))
        for key, answer in session.stream(session_ids([data])):
            if answer is not None:
                verify_chunk(ChunkId(key), decode_payload(*answer), None, "fuzz")
    finally:
        server.asked.set()  # a reader still waiting reads on to the end and stops


def run_chunk(data: bytes) -> None:
    import zstandard

    from pydesync.codec import ZSTD_MAGIC, decompress, zstd_output_bound

    out = decompress(data)
    bound = zstd_output_bound(data)
    if data.startswith(ZSTD_MAGIC) and zstandard.frame_content_size(data) == -1 and len(out) > bound:
        raise AssertionError(f"decoded {len(out)} bytes, above the block walk's bound {bound}")


def socket_pair_fed(data: bytes) -> tuple[socket.socket, threading.Thread]:
    """One end of a connected pair, the other end fed `data` then closed for writing (and
    drained), so a reader sees exactly `data` and then the end of the stream."""
    ours, theirs = socket.socketpair()

    def feed() -> None:
        with theirs, contextlib.suppress(OSError):
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            while theirs.recv(65536):
                pass

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return ours, thread


_HTTP_SERVER: list = []  # one chunk-server core per fuzzing process, started on first use


def fuzz_server():
    """A writable chunk-server over a temporary local store, its loop on a thread of its own."""
    if not _HTTP_SERVER:
        from pydesync.server.chunks import ChunkServer
        from pydesync.server.common import ServerOptions
        from pydesync.store.local import LocalStore

        store = LocalStore(tempfile.mkdtemp(prefix="pydesync-fuzz-"), create=True)
        server = ChunkServer(store, writable=True).server(ServerOptions(listen=[]))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _HTTP_SERVER.append(server)
    return _HTTP_SERVER[0]


def run_httpserver(data: bytes) -> None:
    """A client's byte stream into the server core (parsing, limits, handlers) over a socket pair,
    then the end of its stream; the server must answer and close, and no handler may raise."""
    server = fuzz_server()
    ours, theirs = socket.socketpair()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        server.adopt(ours, ("127.0.0.1", 1))

        def feed() -> None:
            with contextlib.suppress(OSError):
                theirs.sendall(data)
                theirs.shutdown(socket.SHUT_WR)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        theirs.settimeout(CASE_SECONDS)
        with theirs, contextlib.suppress(ConnectionResetError):
            while theirs.recv(65536):  # until the server has answered and closed
                pass
        feeder.join()
    if "internal error" in errors.getvalue():  # a handler raised: a bug answered with 500
        raise AssertionError(errors.getvalue().strip())


def run_httpclient(data: bytes) -> None:
    from pydesync.netio import set_timeouts
    from pydesync.store.http_fast import FastHttp, _Conn

    client = FastHttp("http://127.0.0.1:1/", 2, None, {})
    sock, feeder = socket_pair_fed(data)
    set_timeouts(sock, 2)
    conn = _Conn(sock)
    try:
        for method in ("GET", "GET", "HEAD", "GET"):  # answers to requests sent ahead, read in turn
            if sock.fileno() < 0:  # the last answer ended the connection
                break
            client._receive(conn, method, 1 << 20)
    finally:
        conn.close()
        feeder.join(5)


class Target(NamedTuple):
    seeds: Callable[[], list[bytes]]
    run: Callable[[bytes], None]
    http: bool = False  # OSError is its documented failure too (the HTTP client's callers wrap it)


TARGETS: dict[str, Target] = {
    "index": Target(index_seeds, run_index),
    "catar": Target(catar_seeds, run_catar),
    "protocol": Target(protocol_seeds, run_protocol),
    "push": Target(push_seeds, run_push),
    "session": Target(session_seeds, run_session),
    "remotesync": Target(remotesync_seeds, run_remotesync),
    "chunk": Target(chunk_seeds, run_chunk),
    "httpserver": Target(httpserver_seeds, run_httpserver),
    "httpclient": Target(httpclient_seeds, run_httpclient, http=True),
}


# ---- mutation --------------------------------------------------------------------------------------
def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        kind = rng.randrange(7)
        if not out:
            out += rng.randbytes(rng.randrange(1, 64))
            continue
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2 and len(out) >= 8:
            at = rng.randrange(0, len(out) - 7) & ~7
            out[at:at + 8] = struct.pack("<Q", rng.choice(EXTREMES))
        elif kind == 3:
            del out[rng.randrange(len(out)):]
        elif kind == 4:
            out[at:at] = rng.randbytes(rng.randrange(1, 40))
        elif kind == 5:
            end = min(len(out), at + rng.randrange(1, 200))
            out[at:at] = out[at:end]
        else:
            del out[at:at + rng.randrange(1, 100)]
    return bytes(out)


def problem_of(target: str, data: bytes) -> str | None:
    """None if the case behaved; else what went wrong (the engines' own time limits aside)."""
    from pydesync.errors import PydesyncError

    allowed: tuple[type[BaseException], ...] = (PydesyncError, OSError) if TARGETS[target].http \
        else (PydesyncError,)
    try:
        TARGETS[target].run(data)
    except allowed:
        pass
    except Hang:
        return f"hang (over {CASE_SECONDS} s)"
    except MemoryError:
        return "memory over the cap"
    except Exception:
        return traceback.format_exc(limit=8)
    return None


def one_case(target: str, data: bytes) -> str | None:
    signal.alarm(CASE_SECONDS)
    try:
        return problem_of(target, data)
    except Hang:  # the alarm came after the target returned
        return f"hang (over {CASE_SECONDS} s)"
    finally:
        signal.alarm(0)


CRASHES = HERE / "crashes"  # where failing inputs are saved (--crashes)


def save(target: str, data: bytes, problem: str) -> Path:
    folder = CRASHES
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{target}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(problem)
    return path


def fuzz(target: str, seconds: float, rng: random.Random, runs: int | None = None) -> tuple[int, int]:
    """Mutate seeds for `seconds`, or for exactly `runs` cases (the same cases for the same seed,
    however fast the machine is)."""
    seeds = TARGETS[target].seeds()
    deadline = time.monotonic() + seconds
    cases = failures = 0
    while cases < runs if runs is not None else time.monotonic() < deadline:
        data = mutate(rng, rng.choice(seeds))
        problem = one_case(target, data)
        cases += 1
        if problem is not None:
            failures += 1
            print(f"{target}: {problem.strip().splitlines()[-1]} -> {save(target, data, problem)}")
    return cases, failures


# ---- atheris: coverage-guided, one child process per target ---------------------------------------------
def atheris_child(target: str, seconds: float, artifacts: Path, corpora: Path, runs: int | None) -> None:
    """Run libFuzzer on one target (does not return). Any problem is raised, so that libFuzzer
    saves the input in `artifacts`; its -timeout and -rss_limit_mb catch hangs and memory."""
    import atheris  # type: ignore[import-not-found]

    corpus = corpora / target
    corpus.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=["pydesync"]):
        import pydesync  # noqa: F401

        seeds = TARGETS[target].seeds()
        for seed in seeds:  # imports the target's modules under instrumentation
            problem_of(target, seed)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha256(seed).hexdigest()[:16]}").write_bytes(seed)

    def test_one(data: bytes) -> None:
        problem = problem_of(target, data)
        if problem is not None:
            raise AssertionError(problem)

    longest = max(65536, *map(len, seeds))  # libFuzzer would cut longer seeds (catar's are ~100 KiB)
    budget = f"-runs={runs}" if runs is not None else f"-max_total_time={int(seconds)}"
    atheris.Setup([sys.argv[0], budget, f"-timeout={CASE_SECONDS}",
                   "-rss_limit_mb=2048", f"-max_len={longest}", f"-artifact_prefix={artifacts}/",
                   "-print_final_stats=1", str(corpus)], test_one)
    atheris.Fuzz()


def fuzz_atheris(target: str, seconds: float, corpora: Path, budget: int | None = None) -> tuple[int, int]:
    """Run the atheris child until the time (or the `budget` of runs) is used up, restarting it
    after each failure it finds."""
    deadline = time.monotonic() + seconds
    runs = failures = 0
    with tempfile.TemporaryDirectory() as artifacts:
        while failures < 20:
            left = deadline - time.monotonic()
            if (budget is None and left <= 1) or (budget is not None and runs >= budget):
                break
            limit = ["--seconds", str(left)] if budget is None else ["--runs", str(budget - runs)]
            argv = [sys.executable, __file__, "--atheris-child", target, *limit, "--case-seconds",
                    str(CASE_SECONDS), "--artifacts", artifacts, "--corpus", str(corpora)]
            child = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            runs += sum(int(m) for m in re.findall(r"stat::number_of_executed_units: (\d+)", child.stderr))
            for found in sorted(Path(artifacts).iterdir()):
                data = found.read_bytes()
                kind = found.name.split("-", 1)[0]
                problem = {"timeout": "hang (over 5 s)", "oom": "memory over the cap"}.get(kind) \
                    or problem_of(target, data) or child.stderr[-3000:]
                failures += 1
                print(f"{target}: {problem.strip().splitlines()[-1]} -> {save(target, data, problem)}")
                found.unlink()
            if child.returncode == 0:
                break
            if "ERROR: libFuzzer" not in child.stderr and "Uncaught Python exception" not in child.stderr:
                raise SystemExit(f"atheris child for {target} failed:\n{child.stderr[-3000:]}")
    return runs, failures


def main() -> int:
    global CASE_SECONDS, CRASHES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--seconds", type=float, default=30, help="per target")
    ap.add_argument("--runs", type=int, default=None,
                    help="per target: exactly this many cases instead of a time (what the test suite runs)")
    ap.add_argument("--case-seconds", type=int, default=CASE_SECONDS,
                    help=f"a case running longer is a hang (default {CASE_SECONDS})")
    ap.add_argument("--seed", type=int, default=None, help="random seed of the mutate engine (default: time)")
    ap.add_argument("--engine", choices=["mutate", "atheris"], default="mutate")
    ap.add_argument("--replay", type=Path, help="run the saved inputs in this folder instead")
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus",
                    help="atheris: where each target's learnt inputs are kept (default: fuzz/corpus)")
    ap.add_argument("--crashes", type=Path, default=CRASHES,
                    help="where failing inputs are saved (default: fuzz/crashes, replayed by the suite)")
    ap.add_argument("--atheris-child", choices=list(TARGETS), help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    CASE_SECONDS = args.case_seconds
    CRASHES = args.crashes
    if args.atheris_child:
        atheris_child(args.atheris_child, args.seconds, args.artifacts, args.corpus, args.runs)
        return 0
    if args.engine == "mutate" or args.replay:  # atheris children have libFuzzer's RSS limit instead
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
    if args.replay:
        bad = 0
        for path in sorted(args.replay.glob("*.bin")):
            target = path.name.split("-", 1)[0]
            problem = one_case(target, path.read_bytes())
            print(f"{path.name}: {'ok' if problem is None else problem.strip().splitlines()[-1]}")
            bad += problem is not None
        return 1 if bad else 0
    if args.engine == "mutate":
        seed = args.seed if args.seed is not None else int(time.time())
        print(f"seed {seed}")
        rng = random.Random(seed)
    total_failures = 0
    for target in (TARGETS if args.target == "all" else [args.target]):
        if args.engine == "atheris":
            cases, failures = fuzz_atheris(target, args.seconds, args.corpus, args.runs)
        else:
            cases, failures = fuzz(target, args.seconds, rng, args.runs)
        total_failures += failures
        print(f"{target}: {cases} cases, {failures} failures", flush=True)
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
