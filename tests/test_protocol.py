"""casync's protocol both ways: our `pull` for casync clients, our ssh:// store against casync's pull.

A stand-in `ssh` (CASYNC_SSH_PATH) runs the remote command locally, as casync's own capture tool does;
the same exchanges through a real sshd are in test_ssh_interop.py.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error
from procutil import HANG_GUARD

from pydesync import protocol as P

FAKE_SSH = Path(__file__).resolve().parent.parent / "scripts" / "fake-ssh"


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Path:
    """The stand-in ssh, copied under this test's own path: looking for leftovers of a test then
    never finds another test's (the suite runs tests side by side)."""
    copy = tmp_path / "fake-ssh"
    shutil.copy2(FAKE_SSH, copy)
    return copy


def remote_env(fake_ssh: Path, remote: str | None = None) -> dict[str, str]:
    env = {"CASYNC_SSH_PATH": str(fake_ssh)}
    env["CASYNC_REMOTE_PATH"] = remote or f"{sys.executable} -m pydesync"
    return env


def messages(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        size, kind = struct.unpack_from("<QQ", data, i)
        out.append((kind, data[i + 16: i + size]))
        i += size
    return out


def no_leftovers(marker: str) -> bool:
    """No process whose command line mentions `marker` is left running: the remote side of a
    session ends once its client has (it may take a moment to see the end of its input)."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.strip()
        if not found:
            return True
        time.sleep(0.05)
    return False


def test_pull_answers_recorded_client_once_per_chunk(casync_data: Path):
    """casync's client asked for 2a07... twice (low, then high priority); it gets it once."""
    client = (casync_data / "protocol" / "pull-store-only.c2s.bin").read_bytes()
    r = subprocess.run([sys.executable, "-m", "pydesync", "pull", "-", "-", "-",
                        str(casync_data / "blob-min.castr")], input=client,
                       capture_output=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr
    got = messages(r.stdout)
    assert got[0] == (P.HELLO, struct.pack("<Q", P.READABLE_STORE))
    chunks = [body[8:40].hex()[:12] for kind, body in got[1:] if kind == P.CHUNK]
    assert chunks == ["6c59d08cfafa", "2a0786b30b9e"]
    assert all(struct.unpack_from("<Q", body)[0] == P.CHUNK_COMPRESSED for kind, body in got[1:])


def test_pull_serves_index_and_rejects_bad_hello(casync_data: Path):
    index = casync_data / "blob-min.caibx"
    hello = P.encode(P.HELLO, struct.pack("<Q", P.PULL_INDEX | P.PULL_CHUNKS))
    r = subprocess.run([sys.executable, "-m", "pydesync", "pull", "-", "-", str(index),
                        str(casync_data / "blob-min.castr")], input=hello,
                       capture_output=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr
    got = messages(r.stdout)
    assert got[0][1] == struct.pack("<Q", P.READABLE_STORE | P.READABLE_INDEX)
    assert b"".join(body for kind, body in got if kind == P.INDEX) == index.read_bytes()
    assert got[-1][0] == P.INDEX_EOF
    bad = P.encode(P.HELLO, struct.pack("<Q", P.PULL_ARCHIVE))
    r = subprocess.run([sys.executable, "-m", "pydesync", "pull", "-", "-", "-",
                        str(casync_data / "blob-min.castr")], input=bad,
                       capture_output=True, timeout=HANG_GUARD)
    assert r.returncode != 0 and "Error:" in r.stderr.decode()
    assert messages(r.stdout)[-1][0] == P.ABORT


def test_casync_client_reads_from_our_pull(casync, casync_data: Path, casync_inputs: Path,
                                           fake_ssh: Path, tmp_path: Path):
    store = casync_data / "blob.castr"
    out = tmp_path / "out"
    env = {**os.environ, **remote_env(fake_ssh)}
    index = casync_data / "blob.caibx"
    subprocess.run([casync, "extract", f"--store=localhost:{store}", str(index), str(out)],
                   check=True, env=env, timeout=HANG_GUARD, capture_output=True)
    assert out.read_bytes() == (casync_inputs / "blob.bin").read_bytes()
    out2 = tmp_path / "out2"
    subprocess.run([casync, "extract", f"--store=localhost:{store}", f"localhost:{index}", str(out2)],
                   check=True, env=env, timeout=HANG_GUARD, capture_output=True)
    assert out2.read_bytes() == out.read_bytes()
    assert no_leftovers(str(fake_ssh))


def test_our_client_reads_from_casync_pull(cli, casync, casync_data: Path, casync_inputs: Path,
                                           fake_ssh: Path, tmp_path: Path):
    out = tmp_path / "out"
    r = cli("extract", "-s", f"ssh://localhost{casync_data / 'blob.castr'}", casync_data / "blob.caibx", out,
            env=remote_env(fake_ssh, "casync"))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (casync_inputs / "blob.bin").read_bytes()
    assert no_leftovers(str(fake_ssh))


def test_our_client_reads_from_our_pull(cli, casync_data: Path, casync_inputs: Path, fake_ssh: Path,
                                        tmp_path: Path):
    out = tmp_path / "out"
    r = cli("extract", "-n", "3", "-s", f"ssh://localhost{casync_data / 'blob.castr'}",
            casync_data / "blob.caibx", out, env=remote_env(fake_ssh))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (casync_inputs / "blob.bin").read_bytes()
    assert no_leftovers(str(fake_ssh))


def test_remote_command_missing(cli, casync_data: Path, fake_ssh: Path, tmp_path: Path):
    r = cli("extract", "-s", f"ssh://localhost{casync_data / 'blob.castr'}", casync_data / "blob.caibx",
            tmp_path / "out", env=remote_env(fake_ssh, "/nonexistent/casync"))
    assert_clean_error(r, "ssh localhost")
    assert not (tmp_path / "out").exists()
    assert no_leftovers(str(fake_ssh))


def test_chunk_missing_remotely_falls_through(cli, casync_data: Path, casync_inputs: Path, fake_ssh: Path,
                                              tmp_path: Path):
    partial = tmp_path / "partial.castr"
    shutil.copytree(casync_data / "blob.castr", partial)
    victim = sorted(partial.rglob("*.cacnk"))[0]
    victim.unlink()
    out = tmp_path / "out"
    env = remote_env(fake_ssh)
    r = cli("extract", "-s", f"ssh://localhost{partial}", casync_data / "blob.caibx", out, env=env)
    assert_clean_error(r, victim.name[:64])
    assert not out.exists()
    r = cli("extract", "-s", f"ssh://localhost{partial}", "-s", casync_data / "blob.castr",
            casync_data / "blob.caibx", out, env=env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (casync_inputs / "blob.bin").read_bytes()
    assert no_leftovers(str(fake_ssh))


def test_ssh_location_validation(cli, tmp_path: Path):
    assert_clean_error(cli("extract", "-s", "ssh://-oProxyCommand=x/y", "x.caibx", tmp_path / "o"))


HOSTILE_REMOTE = '''
import struct, sys
out, inp = sys.stdout.buffer, sys.stdin.buffer
def send(kind, body=b""):
    out.write(struct.pack("<QQ", 16 + len(body), kind) + body)
    out.flush()
def receive():
    size, kind = struct.unpack("<QQ", inp.read(16))
    return kind, inp.read(size - 16)
receive()                                          # the client's HELLO
send({hello}, struct.pack("<Q", {readable}))
kind, body = receive()                             # its first REQUEST: flags, then ids
ids = [body[i:i + 32] for i in range(8, len(body), 32)]
mode = sys.argv[-1].strip("/")
for key in ids:                                    # every id asked for gets a hostile answer
    if mode == "huge":
        out.write(struct.pack("<QQ", 1 << 40, {chunk}))
        break
    elif mode == "wrong":
        send({chunk}, struct.pack("<Q", 0) + key + b"not the chunk's data")
    elif mode == "bomb":
        rle = (128 << 13 | 2).to_bytes(3, "little") + b"A"
        send({chunk}, struct.pack("<Q", 1) + key + bytes.fromhex("28b52ffd0038") + rle * 4000)
    elif mode == "stall-inside":
        out.write(struct.pack("<QQ", 1000, {chunk}) + bytes(10))
        break
out.flush()
inp.read()                                         # "stall": asked, never answers
'''


@pytest.mark.parametrize(("mode", "message"), [
    ("huge", "message of 1099511627776 bytes"),
    ("wrong", "does not match"),
    ("bomb", "larger than 128 MiB"),
    ("stall", "no answer for 2 s"),
    ("stall-inside", "stalled for 2 s in the middle of a message"),
])
def test_hostile_pull_server(cli, casync_data: Path, fake_ssh: Path, tmp_path: Path, mode: str, message: str):
    """A remote that declares a 1 TiB message, answers with chunks that are not the ones asked
    for or that would decode to 500 MiB, or goes silent (before or inside an answer; the store's
    timeout is 2 s here): one clear error naming the problem, and no output."""
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_REMOTE.format(hello=P.HELLO, readable=P.READABLE_STORE, chunk=P.CHUNK))
    config = tmp_path / ".config" / "pydesync" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"store-options": {"ssh://localhost/*": {"timeout": 2000000000}}}')
    env = {**remote_env(fake_ssh, f"{sys.executable} {script}"), "HOME": str(tmp_path)}
    r = cli("extract", "-s", f"ssh://localhost/{mode}", casync_data / "blob.caibx", tmp_path / "out", env=env)
    assert_clean_error(r, message)
    assert not (tmp_path / "out").exists()
    assert no_leftovers(str(script))


def test_asking_a_store_twice_for_a_chunk_gets_it_twice(casync_data: Path, fake_ssh: Path, monkeypatch):
    """A pull server answers an id once per session; a second get of the same chunk (a cache
    evicted, `has` then `get`) goes to a session that was not asked for it, instead of waiting for
    an answer that never comes."""
    from pydesync.index import read_index
    from pydesync.store.ssh import SshStore

    for key, value in remote_env(fake_ssh).items():
        monkeypatch.setenv(key, value)
    store = SshStore(f"ssh://localhost{casync_data / 'blob.castr'}")
    try:
        chunk = read_index(str(casync_data / "blob.caibx")).chunks[0]
        first = store.get(chunk.id)
        assert store.has(chunk.id)
        assert store.get(chunk.id) == first and len(first) == chunk.size
        assert list(store.fetch_many([chunk.id])) == [(chunk.id, first)]
    finally:
        store.close()


# ---- our `push`: what casync's make sends, and what a hostile client might -------------------------

def run_push(tmp_path: Path, client: list[tuple[int, bytes]]) -> subprocess.CompletedProcess[bytes]:
    """`pydesync push - - INDEX STORE` fed a client's whole side of the conversation at once."""
    stream = b"".join(P.encode(kind, body) for kind, body in client)
    return subprocess.run([sys.executable, "-m", "pydesync", "push", "-", "-", str(tmp_path / "x.caibx"),
                           str(tmp_path / "store")], input=stream, capture_output=True, timeout=HANG_GUARD)


def recorded_push(casync_data: Path) -> list[tuple[int, bytes]]:
    """casync's make pushing blob-min (HELLO 0xe00, INDEX, INDEX_EOF, two CHUNKs)."""
    return messages((casync_data / "protocol" / "push-index+store.c2s.bin").read_bytes())


def test_push_takes_what_casync_make_sends(casync_data: Path, tmp_path: Path):
    r = run_push(tmp_path, recorded_push(casync_data))
    assert r.returncode == 0, r.stderr
    got = messages(r.stdout)
    assert got[0] == (P.HELLO, struct.pack("<Q", P.WRITABLE_STORE | P.WRITABLE_INDEX))
    requested = b"".join(body[8:] for kind, body in got if kind == P.REQUEST)
    assert sorted(requested[i:i + 6].hex() for i in range(0, len(requested), 32)) == \
        ["2a0786b30b9e", "6c59d08cfafa"]
    assert got[-1][0] == P.GOODBYE
    assert (tmp_path / "x.caibx").read_bytes() == (casync_data / "blob-min.caibx").read_bytes()
    stored = sorted(p.name[:12] for p in (tmp_path / "store").rglob("*.cacnk"))
    assert stored == ["2a0786b30b9e", "6c59d08cfafa"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _corrupt_chunk(client: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    kind, body = client[3]
    return [*client[:3], (kind, struct.pack("<Q", 0) + body[8:40] + b"not the chunk"), *client[4:]]


@pytest.mark.parametrize(("mode", "message"), [
    ("bad-chunk", "does not match"),
    ("bad-compression", "invalid chunk"),
    ("hang-up", "hung up before the push was complete"),
    ("unasked", "was not asked for"),
    ("missing", "lacks chunk"),
    ("bad-index", "invalid index"),
    ("pull", "wants a service we do not offer"),
    ("index-without-chunks", "names 2 chunks that no store here has"),
    ("chunk-first", "a chunk before its index"),
])
def test_hostile_push_client(casync_data: Path, tmp_path: Path, mode: str, message: str):
    """Every way a client can break a push is one error line on our side, an ABORT to the client,
    and no index: a chunk that does not hash to its id (or does not decompress) is never stored."""
    client = recorded_push(casync_data)
    hello, index, eof, chunk1, chunk2 = client
    if mode == "bad-chunk":
        client = _corrupt_chunk(client)
    elif mode == "bad-compression":
        junk = struct.pack("<Q", 1) + chunk1[1][8:40] + b"\x28\xb5\x2f\xfdjunk"  # zstd's magic, then junk
        client = [hello, index, eof, (P.CHUNK, junk), chunk2]
    elif mode == "hang-up":
        client = [hello, index, eof, chunk1]
    elif mode == "unasked":
        client = [hello, index, eof, (P.CHUNK, chunk1[1][:8] + b"\x01" * 32 + chunk1[1][40:]), chunk1, chunk2]
    elif mode == "missing":
        client = [hello, index, eof, (P.MISSING, chunk1[1][8:40]), chunk2]
    elif mode == "bad-index":
        client = [hello, (P.INDEX, index[1][:100] + b"\0" * 40), eof]
    elif mode == "pull":
        client = [(P.HELLO, struct.pack("<Q", P.PULL_CHUNKS))]
    elif mode == "index-without-chunks":  # pushes an index and no chunks, and asks for no REQUESTs
        client = [(P.HELLO, struct.pack("<Q", P.PUSH_INDEX | P.PUSH_CHUNKS)), index, eof, (P.GOODBYE, b"")]
    elif mode == "chunk-first":
        client = [hello, chunk1, index, eof, chunk2]
    r = run_push(tmp_path, client)
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: push: ") and message in lines[0], lines
    assert messages(r.stdout)[-1][0] == P.ABORT
    assert not (tmp_path / "x.caibx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if mode in ("bad-chunk", "bad-compression"):
        assert not [p for p in (tmp_path / "store").rglob("*") if p.name.startswith(chunk1[1][8:14].hex())]


PUSH_REMOTE = '''
import select, struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
out.write(struct.pack("<QQQ", 24, {hello}, {writable}))
out.flush()
if sys.argv[-1].strip("/").endswith("abort"):
    out.write(struct.pack("<QQQ", 16 + 8 + 10, {abort}, 28) + b"disk full\\0")
    out.flush()
hangup = select.poll()                             # reads nothing, says nothing more, and
hangup.register(0, 0)                              # goes when the client has closed its end
hangup.poll()
'''


@pytest.mark.parametrize(("mode", "message"), [
    ("silent", "stopped reading what we send for 2 s"),
    ("abort", "aborted: disk full"),
])
def test_a_remote_that_stops_reading_a_push(casync_data: Path, fake_ssh: Path, tmp_path: Path, cli, mode: str,
                                            message: str):
    """Our make pushing chunks to a remote that reads none of them (silent, or after an ABORT
    saying why): one clear error within the store's timeout (2 s here), the remote's reason first,
    no index, and no spool left."""
    script = tmp_path / "remote.py"
    script.write_text(PUSH_REMOTE.format(hello=P.HELLO, writable=P.WRITABLE_STORE, abort=P.ABORT))
    config = tmp_path / ".config" / "pydesync" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"store-options": {"ssh://localhost/*": {"timeout": 2000000000}}}')
    (tmp_path / "spool").mkdir()
    env = {**remote_env(fake_ssh, f"{sys.executable} {script}"), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path / "spool")}
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20))
    r = cli("make", "-s", f"ssh://localhost/{mode}", tmp_path / "x.caibx", blob, env=env)
    assert_clean_error(r, message)
    assert not (tmp_path / "x.caibx").exists()
    assert os.listdir(tmp_path / "spool") == []
    assert no_leftovers(str(script))
