"""remotesync's wishlist protocol (CAFS, ../shared/spec/REMOTESYNC.md): encodings, shuffling,
round trips with receivers holding some of the chunks, and hostile peers on both sides."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import random
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from procutil import HANG_GUARD, free_port, stop, wait_listening

from pydesync.index import read_index
from pydesync.remotesync import (
    EMPTY_KEY,
    PLACEHOLDER_KEY,
    ChunkInfo,
    SyncError,
    SyncInfo,
    file_syncinfo,
    inverse,
    read_varint,
    receive,
    send,
    shuffle,
    unshuffle,
    varint,
    wishlist,
    wishlist_bits,
)


def chunks_of(rng: random.Random, n: int, duplicates: int = 0) -> tuple[list[bytes], list[ChunkInfo]]:
    datas = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(n)]
    for _ in range(duplicates):
        datas.insert(rng.randrange(0, len(datas) + 1), rng.choice(datas))
    return datas, [ChunkInfo(hashlib.sha256(d).digest(), len(d)) for d in datas]


def transfer(info: SyncInfo, datas: list[bytes], have: set[bytes]) -> tuple[bytes, int, int]:
    """Full exchange in memory; returns (file rebuilt by the receiver, chunks sent, wishlist size)."""
    by_key = {hashlib.sha256(d).digest(): d for d in datas}
    local = {k: by_key[k] for k in have}
    wish = b"".join(wishlist(info, lambda key: key in local))
    out = io.BytesIO()
    send(info, wish, lambda c: by_key[c.key], out.write)
    out.seek(0)
    received: dict[bytes, bytes] = {}
    count = receive(info, wish, out, lambda c, data: received.__setitem__(c.key, data))
    store = {EMPTY_KEY: b"", **local, **received}  # the empty chunk is never asked for: one has it
    return b"".join(store[c.key] for c in info.chunks), count, len(wish)


@pytest.mark.parametrize("held", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 7, 256])
def test_round_trip(held: float, k: int):
    rng = random.Random(int(held * 10) + k)
    datas, chunks = chunks_of(rng, 300, duplicates=40)
    perm = list(range(k))
    rng.shuffle(perm)
    info = SyncInfo(chunks, perm)
    unique = list(dict.fromkeys(c.key for c in chunks))
    have = set(rng.sample(unique, int(len(unique) * held)))
    rebuilt, count, wish_len = transfer(info, datas, have)
    assert rebuilt == b"".join(datas)
    assert count == len(set(unique) - have - {EMPTY_KEY})  # each missing chunk once, duplicates included
    assert wish_len == (len(chunks) + k - 1 + 7) // 8


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=60), st.permutations(list(range(9))))
def test_shuffle_then_unshuffle_is_identity(items: list[int], perm: list[int]):
    shuffled = list(shuffle(items, perm))
    assert len(shuffled) == len(items) + len(perm) - 1
    assert sorted(x for x in shuffled if x is not None) == sorted(items)
    assert list(unshuffle(shuffled, perm)) == items


def test_inverse_matches_the_spec():
    perm = [2, 0, 1]
    assert inverse(perm) == [(1 + 2) % 3, (2 + 2) % 3, (0 + 2) % 3]


def test_encodings():
    rng = random.Random(5)
    _, chunks = chunks_of(rng, 20)
    info = SyncInfo(chunks, [1, 0, 2])
    assert SyncInfo.from_json(info.to_json()) == info
    text = info.to_json().decode()
    assert text.startswith('{"Chunks":[{"Key":"') and text.endswith('"Perm":[1,0,2]}')
    plain = SyncInfo(chunks)
    assert SyncInfo.from_binary(plain.to_binary()) == plain
    assert varint(1) == b"\x02" and varint(64) == b"\x80\x01" and varint(-1) == b"\x01"  # zigzag
    assert read_varint(io.BytesIO(varint(131072))) == 131072
    with pytest.raises(SyncError, match="permutation"):
        SyncInfo(chunks, [0, 0])
    with pytest.raises(SyncError, match="size"):
        SyncInfo.from_json(b'{"Chunks":[{"Key":"' + b"ab" * 32 + b'","Size":131073}],"Perm":[0]}')
    with pytest.raises(SyncError):
        SyncInfo.from_json(b"not json")


def test_wishlist_is_msb_first_and_skips_placeholders():
    _, chunks = chunks_of(random.Random(1), 3)
    info = SyncInfo(chunks, [1, 0])  # 3 chunks + 1 placeholder position
    bits = wishlist_bits(b"".join(wishlist(info, lambda key: False)), info.positions)
    shuffled = list(shuffle(chunks, [1, 0]))
    assert bits == [c is not None for c in shuffled]
    assert b"".join(wishlist(SyncInfo(chunks), lambda key: False)) == bytes([0b11100000])


# ---- hostile peers -------------------------------------------------------------------------------
@pytest.fixture
def setup():
    rng = random.Random(9)
    datas, chunks = chunks_of(rng, 40)
    info = SyncInfo(chunks, [3, 1, 0, 2])
    by_key = {c.key: d for c, d in zip(chunks, datas, strict=True)}
    wish = b"".join(wishlist(info, lambda key: False))
    return info, by_key, wish


def _received(info, wish, stream):
    got = {}
    receive(info, wish, io.BytesIO(stream), lambda c, d: got.__setitem__(c.key, d))
    return got


def test_sender_with_wrong_data(setup):
    info, by_key, wish = setup
    out = io.BytesIO()
    send(info, wish, lambda c: by_key[c.key][:-1] + b"X" if c.size else b"", out.write)
    with pytest.raises(SyncError, match="unexpected chunk"):
        _received(info, wish, out.getvalue())


def test_sender_with_extra_data_or_too_many_chunks(setup):
    info, by_key, wish = setup
    out = io.BytesIO()
    send(info, wish, lambda c: by_key[c.key], out.write)
    with pytest.raises(SyncError, match="unsolicited"):
        _received(info, wish, out.getvalue() + varint(3) + b"abc")
    with pytest.raises(SyncError, match="unexpected end"):
        _received(info, wish, out.getvalue()[:-5])
    with pytest.raises(SyncError, match="illegal chunk length"):
        _received(info, wish, varint(131073) + b"x")


def test_nothing_unchecked_reaches_the_store(setup):
    info, by_key, wish = setup
    out = io.BytesIO()
    send(info, wish, lambda c: by_key[c.key], out.write)
    stored = []
    damaged = bytearray(out.getvalue())
    damaged[len(damaged) // 2] ^= 1
    with pytest.raises(SyncError):
        receive(info, wish, io.BytesIO(bytes(damaged)), lambda c, d: stored.append((c, d)))
    assert all(hashlib.sha256(d).digest() == c.key for c, d in stored)


def test_receiver_asking_for_a_placeholder_or_sending_too_much(setup):
    info, by_key, _ = setup
    everything = b"\xff" * ((info.positions + 7) // 8)  # every bit set, placeholders included
    with pytest.raises(SyncError, match="empty chunk"):
        send(info, everything, lambda c: by_key[c.key], lambda b: None)
    with pytest.raises(SyncError, match="too long"):
        send(info, everything + b"\x00", lambda c: by_key[c.key], lambda b: None)
    with pytest.raises(SyncError, match="too short"):
        send(info, everything[:-1], lambda c: by_key[c.key], lambda b: None)
    assert hashlib.sha256(b"").digest() == PLACEHOLDER_KEY


# ---- CAFS's chunker --------------------------------------------------------------------------------
def oracle_cuts(data: bytes) -> list[int]:
    """CAFS's chunk boundaries, byte by byte from the definition (REMOTESYNC.md section 1)."""
    cuts, start = [], 0
    while start < len(data):
        s1, s2, cut = 1, 0, None
        for j in range(len(data) - start):
            x = data[start + j]
            if j >= 48:
                out = data[start + j - 48]
                s1, s2 = (s1 - out) % 65521, (s2 - 48 * out - 1) % 65521
            s1 = (s1 + x) % 65521
            s2 = (s2 + s1) % 65521
            n = j + 1
            if j >= 48 and ((n > 128 and ((s2 << 16) | s1) % 8191 == 4159) or n > 131072):
                cut = j
                break
        if cut is None:
            break
        start += cut
        cuts.append(start)
    return cuts


@pytest.mark.parametrize("kind", ["random", "text", "zeros", "short"])
def test_cafs_chunker_matches_the_definition(kind: str):
    from pydesync import _chunker
    from pydesync.remotesync import cafs_chunks

    rng = random.Random(kind)
    data = {"random": rng.randbytes(300_000), "text": b"the quick brown fox jumps " * 12000,
            "zeros": bytes(300_000), "short": rng.randbytes(100)}[kind]
    cuts = _chunker.cafs_cuts(data, 0)
    assert cuts == oracle_cuts(data)
    pieces = list(cafs_chunks(io.BytesIO(data), block=7777))  # boundaries do not depend on read sizes
    assert b"".join(pieces) == data
    ends = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    assert ends[:-1] == cuts
    assert all(128 <= len(p) <= 131072 for p in pieces[:-1])
    if kind == "random":
        assert 10 < len(pieces) < 100  # about 8 KiB on average


# ---- over HTTP: sync-serve and sync-get ------------------------------------------------------------
def two_versions(folder: Path, seed: int, size: int, pieces: int, piece: int) -> None:
    """folder/v1 of random bytes, and folder/v2: v1 with `pieces` runs of `piece` bytes rewritten."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    (folder / "v1").write_bytes(data)
    for _ in range(pieces):
        at = rng.randrange(0, size - piece)
        data[at:at + piece] = rng.randbytes(piece)
    (folder / "v2").write_bytes(data)


@pytest.fixture
def served(tmp_path: Path):
    """v1, and v2 = v1 with a few pieces rewritten, v2 offered by a sync-serve process."""
    two_versions(tmp_path, 11, 1_500_000, 4, 10_000)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "sync-serve", "-l", f"127.0.0.1:{port}",
                             str(tmp_path / "v2")], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_listening(proc, port)
    yield tmp_path, port
    stop(proc)


def test_sync_get_with_and_without_a_seed(served):
    d, port = served
    url = f"http://127.0.0.1:{port}/v2"
    r = run_cli("sync-get", "--print-stats", "--seed", d / "v1", url, d / "out")
    assert r.returncode == 0, r.stderr
    assert (d / "out").read_bytes() == (d / "v2").read_bytes()
    with_seed = json.loads(r.stdout)
    r = run_cli("sync-get", "--print-stats", url, d / "out2")
    assert r.returncode == 0 and (d / "out2").read_bytes() == (d / "v2").read_bytes()
    without = json.loads(r.stdout)
    assert with_seed["chunks-received"] < without["chunks-received"] / 5
    assert with_seed["bytes-received"] < 200_000


def test_http_rules(served):
    _, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    conn.request("GET", "/v2")
    answer = conn.getresponse()
    info = SyncInfo.from_json(answer.read())
    assert answer.status == 200 and info.positions == len(info.chunks) + 255
    for method, path, headers, status in (("POST", "/v2", {}, 400), ("PUT", "/v2", {}, 405),
                                          ("GET", "/nothing", {}, 404)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
        conn.request(method, path, body=b"\x00" if method != "GET" else None, headers=headers)
        assert conn.getresponse().status == status, (method, path)


def test_full_duplex_with_a_chunked_wishlist(served):
    """As CAFS's client does: the wishlist trickles in chunked encoding while the answer streams;
    the first chunk arrives before the wishlist is finished."""
    d, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    conn.request("GET", "/v2")
    info = SyncInfo.from_json(conn.getresponse().read())
    wish = b"".join(wishlist(info, lambda key: False))
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(b"POST /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        first = wish[:40]  # enough bits for the first requested chunks (k = 256: past the flushing delay)
        s.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 10:
            more = s.recv(65536)
            assert more, "no data before the wishlist was complete"
            received += more
        rest = wish[40:]
        s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        while more := s.recv(65536):
            received += more
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    got: dict[bytes, bytes] = {}
    receive(info, wish, io.BytesIO(body), lambda c, data: got.__setitem__(c.key, data))
    assert b"".join(got[c.key] for c in info.chunks) == (d / "v2").read_bytes()


def test_sync_get_from_a_lying_server(tmp_path: Path):
    """A server whose data does not match its SyncInfo: a clean error, no output left behind."""

    data = random.Random(2).randbytes(50_000)
    info, _ = file_syncinfo(io.BytesIO(data))

    class Liar(BaseHTTPRequestHandler):
        def do_GET(self):
            body = info.to_json()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            for c in info.chunks:
                self.wfile.write(varint(c.size) + bytes(c.size))  # right sizes, wrong bytes

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run_cli("sync-get", f"http://127.0.0.1:{server.server_address[1]}/f", tmp_path / "out")
    finally:
        server.shutdown()
    assert_clean_error(r, "unexpected chunk")
    assert list(tmp_path.iterdir()) == []


# ---- our mode: chunk-server /sync/<index> and extract --sync ------------------------------------------
@pytest.fixture
def sync_server(tmp_path: Path):
    two_versions(tmp_path, 21, 2_000_000, 3, 30_000)
    (tmp_path / "idx").mkdir()
    for name in ("v1", "v2"):
        r = run_cli("make", "-m", "4:16:64", "-s", tmp_path / "store", tmp_path / "idx" / f"{name}.caibx",
                    tmp_path / name)
        assert r.returncode == 0, r.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pydesync", "chunk-server", "-s", str(tmp_path / "store"),
                             "-l", f"127.0.0.1:{port}", "--sync-index-store", str(tmp_path / "idx"),
                             "--log", str(tmp_path / "access.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_listening(proc, port)
    yield tmp_path, f"http://127.0.0.1:{port}"
    stop(proc)


def test_extract_sync_fetches_the_missing_chunks_in_one_round_trip(sync_server):
    d, base = sync_server
    r = run_cli("extract", "--sync", f"{base}/sync/v2.caibx", "-s", f"{base}/", "--seed",
                f"{d / 'idx' / 'v1.caibx'}:{d / 'v1'}", d / "idx" / "v2.caibx", d / "out")
    assert r.returncode == 0, r.stderr
    assert (d / "out").read_bytes() == (d / "v2").read_bytes()
    log = (d / "access.log").read_text().splitlines()
    requests = [line.split("Request: ")[1].split(",")[0] for line in log]
    assert [q for q in requests if "/sync/" not in q] == []  # no chunk fetched one by one
    assert sorted(requests)[-2:] == ["GET /sync/v2.caibx", "POST /sync/v2.caibx"]
    assert not [p for p in d.iterdir() if p.name.startswith(".pydesync-sync-")]


def test_extract_sync_fills_the_cache(sync_server):
    d, base = sync_server
    r = run_cli("extract", "--sync", f"{base}/sync/v2.caibx", "-s", f"{base}/", "-c", d / "cache",
                d / "idx" / "v2.caibx", d / "out")
    assert r.returncode == 0, r.stderr
    assert (d / "out").read_bytes() == (d / "v2").read_bytes()
    unique = {c.id for c in read_index(str(d / "idx" / "v2.caibx"))}
    assert len(list((d / "cache").rglob("*.cacnk"))) == len(unique)


def test_sync_refusals(sync_server):
    d, base = sync_server
    r = run_cli("extract", "--sync", f"{base}/sync/v1.caibx", "-s", f"{base}/", d / "idx" / "v2.caibx",
                d / "out")
    assert_clean_error(r, "another index")
    port = int(base.rsplit(":", 1)[1])
    for headers, body, status in (({}, b"\x00", 400), ({"Connection": "close"}, b"\x00" * 100_000, 400)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
        conn.request("POST", "/sync/v2.caibx", body=body, headers=headers)
        assert conn.getresponse().status == status
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    conn.request("GET", "/sync/nothing.caibx")
    assert conn.getresponse().status == 404


def test_an_empty_file_is_one_empty_chunk_never_asked_for(tmp_path):
    """As CAFS: an empty file's SyncInfo lists the empty key with size 0, and a receiver's
    wishlist never sets its bit."""
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "empty", "rb") as f:
        info, offsets = file_syncinfo(f)
    assert [(c.key, c.size) for c in info.chunks] == [(EMPTY_KEY, 0)] and offsets == [0]
    assert set(b"".join(wishlist(info, lambda key: False))) == {0}
