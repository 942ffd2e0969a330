"""sftp:// chunk and index stores against a real sshd on 127.0.0.1 (the `sshd` fixture).

The store runs `$CASYNC_SSH_PATH -s -- host sftp`; the fixture's wrapper is the
real ssh with a client config for the run (key, known_hosts, port).
"""

from __future__ import annotations

import getpass
import os
import random
import re
import shutil
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Sshd, assert_clean_error, need, run_cli
from procutil import HANG_GUARD, processes
from sshd_util import ipv6_loopback

from pydesync.digest import SHA512_256, digest_of
from pydesync.errors import ChunkMissing, StoreError
from pydesync.index import read_index
from pydesync.store import open_store
from pydesync.store.base import StoreOptions

CHUNK_FILE = re.compile(r"^([0-9a-f]{4})/(\1[0-9a-f]{60})\.cacnk$")
CLI_TIMEOUT = HANG_GUARD


@pytest.fixture(autouse=True)
def hang_guard():
    """No test here may hang (in-process sftp sessions too): SIGALRM fails it after HANG_GUARD."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"sftp test still running after {HANG_GUARD:.0f} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(HANG_GUARD))
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def ssh_env(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> Sshd:
    """CASYNC_SSH_PATH set for in-process stores too."""
    monkeypatch.setenv("CASYNC_SSH_PATH", sshd.ssh)
    return sshd


def sftp_cli(sshd: Sshd, *args: str | os.PathLike[str]):
    result = run_cli(*args, env=sshd.env, timeout=CLI_TIMEOUT)
    assert not ssh_clients(sshd), "ssh processes left running after the command"
    return result


def ssh_clients(sshd: Sshd, parent: int | None = None) -> list[int]:
    """Pids of ssh clients using the fixture's config (children of `parent` if given)."""
    config = f"{sshd.dir}/ssh_config".encode()
    return processes(lambda argv, ppid: (config in argv or sshd.ssh.encode() in argv)
                     and (parent is None or ppid == parent))


def blob(path: Path, seed: int, size: int = 700_000) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def chunk_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


def url(path: Path, host: str = "127.0.0.1") -> str:
    return f"sftp://{host}{path}"


# ---- CLI -------------------------------------------------------------------------------------------

def test_make_extract_round_trip(sshd: Sshd, tmp_path: Path):
    data = blob(tmp_path / "blob", 1)
    store = tmp_path / "store"
    store.mkdir()
    location = f"sftp://{getpass.getuser()}@127.0.0.1:{sshd.port}{store}"  # user and port in the URL
    r = sftp_cli(sshd, "make", "-n", "4", "-s", location, tmp_path / "blob.caibx", tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    index = read_index(str(tmp_path / "blob.caibx"))
    files = chunk_files(store)
    assert all(CHUNK_FILE.match(f) for f in files), files  # no temporary names left behind
    assert {CHUNK_FILE.match(f).group(2) for f in files} == {c.id.hex() for c in index}  # type: ignore[union-attr]

    r = sftp_cli(sshd, "extract", "-s", url(store), tmp_path / "blob.caibx", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data


def test_ipv6_host_literal(sshd: Sshd, tmp_path: Path):
    """`sftp://[::1]:PORT/path` and `ssh://[::1]:PORT/path`: the bracketed literal reaches ssh bare
    (the ssh:// store runs our `pull` on the far side of the real sshd)."""
    need(ipv6_loopback(), "no IPv6 loopback on this machine")
    data = blob(tmp_path / "blob", 7)
    store = tmp_path / "store"
    store.mkdir()
    index, out = tmp_path / "b.caibx", tmp_path / "out"
    location = f"sftp://[::1]:{sshd.port}{store}"
    assert sftp_cli(sshd, "make", "-s", location, index, tmp_path / "blob").returncode == 0
    r = sftp_cli(sshd, "extract", "-s", location, index, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    remote = f"{sys.executable} -m pydesync"
    r = run_cli("extract", "-s", f"ssh://[::1]:{sshd.port}{store}", index, tmp_path / "out2",
                env={**sshd.env, "CASYNC_REMOTE_PATH": remote}, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out2").read_bytes() == data


@pytest.mark.parametrize("scheme", ["sftp", "ssh"])
def test_bad_port_is_a_clean_error(tmp_path: Path, scheme: str):
    r = run_cli("extract", "-s", f"{scheme}://127.0.0.1:99999{tmp_path}", tmp_path / "x.caibx",
                tmp_path / "o")
    assert_clean_error(r, "port")


def test_index_over_sftp(sshd: Sshd, tmp_path: Path):
    data = blob(tmp_path / "blob", 2)
    store, indexes = tmp_path / "store", tmp_path / "indexes"
    store.mkdir()
    indexes.mkdir()
    index_url = url(indexes / "blob.caibx")
    r = sftp_cli(sshd, "make", "-s", url(store), index_url, tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    assert os.listdir(indexes) == ["blob.caibx"]
    assert len(read_index(str(indexes / "blob.caibx"))) > 1

    # Read back through a Host alias that has no Port: the URL's port must be used.
    alias_url = f"sftp://pydesync-noport:{sshd.port}{indexes}/blob.caibx"
    r = sftp_cli(sshd, "extract", "-s", url(store), alias_url, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data

    r = sftp_cli(sshd, "extract", "-s", url(store), url(indexes / "nope.caibx"), tmp_path / "out2")
    assert_clean_error(r, "nope.caibx", "does not exist")


def test_missing_chunk_falls_through(sshd: Sshd, tmp_path: Path):
    data = blob(tmp_path / "blob", 3)
    full = tmp_path / "full"
    r = run_cli("make", "-s", full, tmp_path / "blob.caibx", tmp_path / "blob", timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    victim = sorted(partial.rglob("*.cacnk"))[0]
    victim.unlink()
    victim_id = victim.name[:64]

    r = sftp_cli(sshd, "extract", "-s", url(partial), tmp_path / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, victim_id, "missing")
    assert not (tmp_path / "out").exists()

    for second in (str(full), url(full)):
        r = sftp_cli(sshd, "extract", "-s", url(partial), "-s", second, tmp_path / "blob.caibx",
                     tmp_path / "out")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == data


def test_verify_and_prune(sshd: Sshd, tmp_path: Path):
    blob(tmp_path / "a", 4)
    blob(tmp_path / "b", 5)
    store = tmp_path / "store"
    store.mkdir()
    for name in ("a", "b"):
        r = sftp_cli(sshd, "make", "-s", url(store), tmp_path / f"{name}.caibx", tmp_path / name)
        assert r.returncode == 0, r.stderr
    ids_a = {c.id.hex() for c in read_index(str(tmp_path / "a.caibx"))}
    ids_b = {c.id.hex() for c in read_index(str(tmp_path / "b.caibx"))}

    bad_id = "1234" + "0" * 60
    bad = store / "1234" / f"{bad_id}.cacnk"
    bad.parent.mkdir()
    bad.write_bytes(b"invalid")
    r = sftp_cli(sshd, "verify", "-s", url(store))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and bad_id in lines[0] and "removed" not in lines[0]
    assert bad.exists()
    r = sftp_cli(sshd, "verify", "-s", url(store), "-r", "-n", "3")
    assert r.returncode == 0 and bad_id in r.stderr and "removed" in r.stderr
    assert not bad.exists()
    r = sftp_cli(sshd, "verify", "-s", url(store))
    assert r.returncode == 0 and r.stderr.strip() == ""

    some_b = sorted(ids_b - ids_a)[0]
    leftover = store / some_b[:4] / f"{some_b}.cacnk8245109733"  # an interrupted write's temp name
    leftover.write_bytes(b"partial")
    r = sftp_cli(sshd, "prune", "-y", "-s", url(store), tmp_path / "a.caibx")
    assert r.returncode == 0, r.stderr
    left = {CHUNK_FILE.match(f).group(2) for f in chunk_files(store)}  # type: ignore[union-attr]
    assert left == ids_a
    r = sftp_cli(sshd, "extract", "-s", url(store), tmp_path / "a.caibx", tmp_path / "out")
    assert r.returncode == 0 and (tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()


def test_nonexistent_base_path(sshd: Sshd, tmp_path: Path):
    blob(tmp_path / "blob", 6, 50_000)
    r = run_cli("make", "-s", tmp_path / "local", tmp_path / "blob.caibx", tmp_path / "blob",
                timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    missing = tmp_path / "no" / "such" / "store"
    r = sftp_cli(sshd, "extract", "-s", url(missing), tmp_path / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, str(missing), "does not exist")
    r = sftp_cli(sshd, "make", "-s", url(missing), tmp_path / "b2.caibx", tmp_path / "blob")
    assert_clean_error(r, str(missing), "does not exist")
    assert not (tmp_path / "b2.caibx").exists()
    # The second store is bad: the first one's connection must not be left behind either.
    r = sftp_cli(sshd, "extract", "-s", url(tmp_path / "local"), "-s", url(missing),
                 tmp_path / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, "does not exist")


def test_a_missing_store_is_created_by_the_local_rule(sshd: Sshd, tmp_path: Path):
    """Writing into an sftp store that does not exist makes it when its parent exists, as a local
    store is made; reading does not, and a missing parent or a file in the way is one error."""
    data = blob(tmp_path / "blob", 7, 300_000)
    new = tmp_path / "new.castr"
    r = sftp_cli(sshd, "verify", "-s", url(new))
    assert_clean_error(r, str(new), "does not exist")
    assert not new.exists()
    r = sftp_cli(sshd, "make", "-s", url(new), tmp_path / "b.caibx", tmp_path / "blob")
    assert r.returncode == 0, r.stderr
    assert new.is_dir() and chunk_files(new)
    r = sftp_cli(sshd, "extract", "-s", url(new), tmp_path / "b.caibx", tmp_path / "out")
    assert r.returncode == 0 and (tmp_path / "out").read_bytes() == data, r.stderr
    deeper = tmp_path / "no" / "store"
    r = sftp_cli(sshd, "make", "-s", url(deeper), tmp_path / "c.caibx", tmp_path / "blob")
    assert_clean_error(r, "cannot create store", str(tmp_path / "no"), "does not exist")
    assert not (tmp_path / "no").exists() and not (tmp_path / "c.caibx").exists()
    (tmp_path / "file").write_bytes(b"x")
    r = sftp_cli(sshd, "make", "-s", url(tmp_path / "file"), tmp_path / "c.caibx", tmp_path / "blob")
    assert_clean_error(r, "not a directory")


def test_ssh_failures_are_clean_errors(sshd: Sshd, tmp_path: Path):
    # A Host alias without a port: ssh goes to port 22 and fails (refused, or unknown host key).
    r = sftp_cli(sshd, "verify", "-s", f"sftp://pydesync-noport{tmp_path}")
    assert_clean_error(r, "ssh failed")
    r = run_cli("verify", "-s", url(tmp_path), env={"CASYNC_SSH_PATH": str(tmp_path / "no-ssh")},
                timeout=CLI_TIMEOUT)
    assert_clean_error(r, "cannot run", "no-ssh")
    r = sftp_cli(sshd, "verify", "-s", "sftp://-oProxyCommand=x/p")
    assert_clean_error(r, "invalid ssh destination")


# ---- the store API ---------------------------------------------------------------------------------

def test_store_api_pool_and_close(ssh_env: Sshd, tmp_path: Path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = open_store(url(store_dir), StoreOptions(concurrency=4))
    assert store.remote and store.writable
    chunks = [random.Random(i).randbytes(20_000 + i) for i in range(24)]
    ids = [digest_of(c, SHA512_256) for c in chunks]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(store.put, ids, chunks))
            list(pool.map(store.put, ids, chunks))  # idempotent
            assert list(pool.map(store.get, ids)) == chunks
            assert all(pool.map(store.has, ids))
        assert 1 <= len(ssh_clients(ssh_env, os.getpid())) <= 4  # pooled, never more than -n
        assert sorted(store.ids()) == sorted(ids)
        first = store_dir / ids[0].hex()[:4] / f"{ids[0].hex()}.cacnk"
        assert store.stored_size(ids[0]) == first.stat().st_size
        store.remove(ids[0])
        store.remove(ids[0])  # removing an absent chunk is fine
        assert not store.has(ids[0]) and store.stored_size(ids[0]) is None
        with pytest.raises(ChunkMissing):
            store.get(ids[0])
    finally:
        store.close()
    assert ssh_clients(ssh_env, os.getpid()) == []

    with pytest.raises(StoreError, match="does not exist"):
        open_store(url(tmp_path / "nope"))
    assert ssh_clients(ssh_env, os.getpid()) == []


def test_lost_connection_is_replaced(ssh_env: Sshd, tmp_path: Path):
    data = b"chunk data" * 1000
    chunk_id = digest_of(data, SHA512_256)
    with open_store(url(tmp_path), StoreOptions(concurrency=1)) as store:
        store.put(chunk_id, data)
        (pid,) = ssh_clients(ssh_env, os.getpid())
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(StoreError, match="connection lost"):
            store.get(chunk_id)
        assert store.get(chunk_id) == data  # a fresh connection
        assert len(ssh_clients(ssh_env, os.getpid())) == 1
    assert ssh_clients(ssh_env, os.getpid()) == []


def test_uncompressed_store_layout(ssh_env: Sshd, tmp_path: Path):
    data = b"plain" * 5000
    chunk_id = digest_of(data, SHA512_256)
    with open_store(url(tmp_path), StoreOptions(uncompressed=True, concurrency=1)) as store:
        store.put(chunk_id, data)
        assert (tmp_path / chunk_id.hex()[:4] / chunk_id.hex()).read_bytes() == data
        assert store.get(chunk_id) == data
        assert list(store.ids()) == [chunk_id]


def test_ssh_command_line(monkeypatch: pytest.MonkeyPatch):
    from pydesync.store.sftp import ssh_command

    monkeypatch.delenv("CASYNC_SSH_PATH", raising=False)
    assert ssh_command("h", None, None) == ["ssh", "-s", "--", "h", "sftp"]
    monkeypatch.setenv("CASYNC_SSH_PATH", "/opt/my ssh")
    assert ssh_command("h", 2222, "u") == ["/opt/my ssh", "-p", "2222", "-s", "--", "u@h", "sftp"]


def test_a_file_larger_than_any_chunk_is_refused_unread(sshd: Sshd, tmp_path: Path):
    """A hostile or stray 200 MiB file under a chunk's name is refused from its size (the file is
    sparse: reading it would take seconds and the memory; refusing it takes neither)."""
    blob(tmp_path / "blob", 4)
    store = tmp_path / "store"
    assert run_cli("make", "-s", store, tmp_path / "blob.caibx", tmp_path / "blob").returncode == 0
    victim = next(store.glob("*/*.cacnk"))
    with open(victim, "r+b") as f:
        f.truncate(200 << 20)
    r = sftp_cli(sshd, "extract", "-s", url(store), tmp_path / "blob.caibx", tmp_path / "out")
    assert_clean_error(r, victim.name, "longer than")
    assert not (tmp_path / "out").exists()
