"""casync's ssh pull protocol through a REAL sshd on 127.0.0.1 (the `sshd` fixture), both ways.

* our client against casync's `pull`: a store made by `casync make` is read with
  `pydesync extract -s ssh://127.0.0.1/STORE` (blob) and `pydesync untar -i -s ssh://...` (tree),
  the remote side being `casync pull` started by sshd (CASYNC_REMOTE_PATH=casync);
* casync's client against our `pull`: a store made by `pydesync make` / `pydesync tar -i` is read
  with `casync extract --store=127.0.0.1:/STORE`, the remote side being `python -m pydesync pull`;
* a chunk missing on the remote store: one clean error line from us (either pull on the far side),
  a failure from casync's client, and no output;
* a tree whose .caidx names chunks twice: casync's client against our pull works; our `untar -i`
  against casync's pull asks each distinct chunk once (casync answers an id once per session).

The blob (4 MiB of random bytes) spans dozens of chunks; the tree (files of distinct random contents,
subdirectories, symlinks, several modes, other owners when run as root, fixed mtimes) is compared
entry by entry (its .caidx repeats no chunk id: repeats have tests of their own). Every
client run must have logged in to the test's sshd and leave no ssh client or remote `pull` behind.
tests/test_protocol.py covers the same protocol through the stand-in scripts/fake-ssh.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import Sshd, assert_clean_error, run_cli
from procutil import HANG_GUARD, processes
from sshd_util import REMOTE_PYDESYNC

from pydesync.index import read_index

pytestmark = pytest.mark.casync

TIMEOUT = HANG_GUARD  # for every child process, never a speed requirement
BLOB_SIZE = 4 * 1024 * 1024


# ---- helpers ---------------------------------------------------------------------------------------

def remote_env(sshd: Sshd, remote: str) -> dict[str, str]:
    """Environment for a client: the fixture's ssh, and what to run on the far side."""
    return {**sshd.env, "CASYNC_REMOTE_PATH": remote}


def run_casync(casync: str, *args: str | os.PathLike[str],
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if k != "PYDESYNC_REQUIRE_PEERS"}
    full_env.update(env or {})
    return subprocess.run([casync, *map(str, args)], capture_output=True, env=full_env,
                          stdin=subprocess.DEVNULL, timeout=TIMEOUT)


def ok_casync(casync: str, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
    r = run_casync(casync, *args, env=env)
    assert r.returncode == 0, f"casync {' '.join(map(str, args))}: {r.stderr.decode(errors='replace')}"


def ok_cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
    r = run_cli(*args, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, f"pydesync {' '.join(map(str, args))}: {r.stderr}"


def ssh_clients(sshd: Sshd) -> list[int]:
    """Pids of live ssh clients that use the fixture's config."""
    config = f"{sshd.dir}/ssh_config".encode()
    return processes(lambda argv, _: config in argv or sshd.ssh.encode() in argv)


def pull_servers(store: Path) -> list[int]:
    """Pids of live `... pull - - - STORE` processes for this test's store (the remote side)."""
    marker = str(store).encode()
    return processes(lambda argv, _: b"pull" in argv and any(marker in a for a in argv))


def remote_store(tmp_path: Path) -> Path:
    """Where the "remote" store goes (its parent made: a missing store is created only there)."""
    (tmp_path / "remote").mkdir(exist_ok=True)
    return tmp_path / "remote" / "store.castr"


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def make_blob(path: Path, seed: int = 1) -> bytes:
    data = random_bytes(seed, BLOB_SIZE)
    path.write_bytes(data)
    return data


MTIME_NS = 1_650_000_000_123_456_789


def make_tree(root: Path, repeated: bool = False) -> None:
    """Files of distinct random contents (some spanning several chunks), nested directories, an
    empty file and directory, a relative symlink and a dangling one, various modes. With `repeated`,
    two identical 1 MiB files: their chunks appear twice in the .caidx."""
    files = {
        "a.bin": (random_bytes(11, 700_000), 0o644),
        "run.sh": (b"#!/bin/sh\necho hello from the tree\n", 0o755),
        "sub/b.bin": (random_bytes(12, 1_300_000), 0o600),
        "sub/notes.txt": (b"".join(b"line %d of the notes\n" % i for i in range(2000)), 0o640),
        "sub/deeper/c.dat": (random_bytes(13, 400_000), 0o444),
        "sub/deeper/empty": (b"", 0o644),
    }
    if repeated:
        same = random_bytes(14, 1 << 20)
        files["copy1.bin"] = (same, 0o644)
        files["sub/copy2.bin"] = (same, 0o644)
    root.mkdir()
    for d, mode in (("sub", 0o750), ("sub/deeper", 0o755), ("emptydir", 0o700)):
        (root / d).mkdir()
        (root / d).chmod(mode)
    for name, (data, mode) in files.items():
        (root / name).write_bytes(data)
        (root / name).chmod(mode)
    (root / "link").symlink_to("sub/b.bin")
    (root / "sub" / "dangling").symlink_to("../nowhere")
    if os.geteuid() == 0:  # an owner other than the one extracting (the suite runs as root)
        os.chown(root / "sub" / "notes.txt", 1234, 5678)
        os.chown(root / "link", 4321, 8765, follow_symlinks=False)
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # children before parents
        os.utime(path, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))


def snapshot(root: Path) -> dict[str, tuple]:
    """What a faithful extraction must reproduce: per path its type, mode, owner, mtime and
    contents (files) or target (symlinks)."""
    out: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        common = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (*common, st.st_mtime_ns, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = (*common, st.st_mtime_ns, path.read_bytes())
        else:
            out[rel] = (*common, st.st_mtime_ns)
    return out


def unique_ids(index: Path) -> bool:
    ids = [c.id for c in read_index(str(index))]
    return len(ids) == len(set(ids))


def assert_blob_index(index: Path) -> None:
    chunks = list(read_index(str(index)))
    assert len(chunks) >= 20, f"the blob should span many chunks, got {len(chunks)}"
    assert len({c.id for c in chunks}) == len(chunks), "no chunk id may repeat here"


def logins(sshd: Sshd) -> int:
    """Sessions the fixture's sshd has accepted so far (it logs each before running the command)."""
    return (sshd.dir / "sshd.log").read_text(errors="replace").count("Accepted publickey for ")


def assert_clean_after(sshd: Sshd, store: Path, logins_before: int) -> None:
    """The client went through the real sshd, and nothing of the conversation is left running: no
    ssh client, no remote pull (ssh exits after the remote command has, so this is not a race)."""
    assert logins(sshd) > logins_before, "the client never logged in to the test's sshd"
    assert not ssh_clients(sshd), "ssh clients left running after the command"
    assert not pull_servers(store), "remote pull processes left running after the command"


# ---- (a) our client, casync's pull on the far side of sshd -----------------------------------------

def test_blob_our_client_casync_pull(casync: str, sshd: Sshd, tmp_path: Path):
    data = make_blob(tmp_path / "blob")
    store, index, out = remote_store(tmp_path), tmp_path / "x.caibx", tmp_path / "out"
    ok_casync(casync, "make", f"--store={store}", index, tmp_path / "blob")
    assert_blob_index(index)
    before = logins(sshd)
    ok_cli("extract", "-s", f"ssh://127.0.0.1{store}", index, out, env=remote_env(sshd, "casync"))
    assert out.read_bytes() == data
    assert_clean_after(sshd, store, before)


def test_tree_our_client_casync_pull(casync: str, sshd: Sshd, tmp_path: Path):
    src = tmp_path / "src"
    make_tree(src)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caidx", tmp_path / "out"
    ok_casync(casync, "make", f"--store={store}", index, src)
    assert unique_ids(index), "the tree's .caidx must not repeat a chunk id here"
    assert len(list(read_index(str(index)))) >= 20
    before = logins(sshd)
    ok_cli("untar", "-i", "-s", f"ssh://127.0.0.1{store}", index, out, env=remote_env(sshd, "casync"))
    assert snapshot(out) == snapshot(src)
    assert os.readlink(out / "link") == "sub/b.bin"
    assert_clean_after(sshd, store, before)


# ---- (b) casync's client, our pull on the far side of sshd -----------------------------------------

def test_blob_casync_client_our_pull(casync: str, sshd: Sshd, tmp_path: Path):
    data = make_blob(tmp_path / "blob", seed=2)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caibx", tmp_path / "out"
    ok_cli("make", "-s", store, index, tmp_path / "blob")
    assert_blob_index(index)
    before = logins(sshd)
    ok_casync(casync, "extract", f"--store=127.0.0.1:{store}", index, out,
              env=remote_env(sshd, REMOTE_PYDESYNC))
    assert out.read_bytes() == data
    assert_clean_after(sshd, store, before)


def test_tree_casync_client_our_pull(casync: str, sshd: Sshd, tmp_path: Path):
    src = tmp_path / "src"
    make_tree(src)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caidx", tmp_path / "out"
    ok_cli("tar", "-i", "-s", store, index, src)
    assert unique_ids(index), "the tree's .caidx must not repeat a chunk id here"
    assert len(list(read_index(str(index)))) >= 20
    before = logins(sshd)
    ok_casync(casync, "extract", f"--store=127.0.0.1:{store}", index, out,
              env=remote_env(sshd, REMOTE_PYDESYNC))
    assert snapshot(out) == snapshot(src)
    assert_clean_after(sshd, store, before)


# ---- a chunk missing on the remote store -----------------------------------------------------------

@pytest.mark.parametrize("remote", ["casync", "pydesync"])
def test_missing_remote_chunk_is_a_clean_error(casync: str, sshd: Sshd, tmp_path: Path, remote: str):
    """Our client, either pull on the far side: the missing chunk is named in one error line and no
    output (not even a partial one) is left behind."""
    make_blob(tmp_path / "blob", seed=3)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caibx", tmp_path / "out"
    ok_cli("make", "-s", store, index, tmp_path / "blob")
    chunks = sorted(store.rglob("*.cacnk"))
    victim = chunks[len(chunks) // 2]
    victim.unlink()
    before = logins(sshd)
    r = run_cli("extract", "-s", f"ssh://127.0.0.1{store}", index, out,
                env=remote_env(sshd, "casync" if remote == "casync" else REMOTE_PYDESYNC), timeout=TIMEOUT)
    assert_clean_error(r, victim.name[:64])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "remote", "x.caibx"]
    assert_clean_after(sshd, store, before)


def test_missing_remote_chunk_casync_client(casync: str, sshd: Sshd, tmp_path: Path):
    """casync's client against our pull lacking a chunk: casync fails with ENOENT, no output left."""
    make_blob(tmp_path / "blob", seed=4)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caibx", tmp_path / "out"
    ok_cli("make", "-s", store, index, tmp_path / "blob")
    chunks = sorted(store.rglob("*.cacnk"))
    chunks[len(chunks) // 2].unlink()
    before = logins(sshd)
    r = run_casync(casync, "extract", f"--store=127.0.0.1:{store}", index, out,
                   env=remote_env(sshd, REMOTE_PYDESYNC))
    assert r.returncode != 0
    assert "No such file or directory" in r.stderr.decode(errors="replace")  # MISSING: ENOENT
    assert not out.exists()
    assert_clean_after(sshd, store, before)


# ---- a chunk id repeated in the index --------------------------------------------------------------

def test_tree_with_repeated_chunks_casync_client_our_pull(casync: str, sshd: Sshd, tmp_path: Path):
    """The tree with two identical 1 MiB files, read by `casync extract` from our pull, which
    answers each id once per session as casync's does: casync gets everything it needs."""
    src = tmp_path / "src"
    make_tree(src, repeated=True)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caidx", tmp_path / "out"
    ok_cli("tar", "-i", "-s", store, index, src)
    assert not unique_ids(index)
    before = logins(sshd)
    ok_casync(casync, "extract", f"--store=127.0.0.1:{store}", index, out,
              env=remote_env(sshd, REMOTE_PYDESYNC))
    assert snapshot(out) == snapshot(src)
    assert_clean_after(sshd, store, before)


@pytest.mark.parametrize("threads", ["1", "10"])
def test_tree_with_repeated_chunks_our_client_casync_pull(casync: str, sshd: Sshd, tmp_path: Path,
                                                          threads: str):
    """The tree with two identical 1 MiB files, read by `pydesync untar -i` (and `cat`) from casync's
    pull, which answers each id once per session: each distinct chunk is asked for once (its
    repeat served from what was received). With -n 1 a repeat always comes after the answer."""
    src = tmp_path / "src"
    make_tree(src, repeated=True)
    store, index, out = remote_store(tmp_path), tmp_path / "x.caidx", tmp_path / "out"
    ok_casync(casync, "make", f"--store={store}", index, src)
    if unique_ids(index):
        pytest.fail("the tree's .caidx should repeat a chunk id")
    location = f"ssh://127.0.0.1{store}"
    before = logins(sshd)
    ok_cli("untar", "-i", "-n", threads, "-s", location, index, out, env=remote_env(sshd, "casync"))
    assert snapshot(out) == snapshot(src)
    ok_cli("cat", "-n", threads, "-s", location, index, tmp_path / "x.catar", env=remote_env(sshd, "casync"))
    ok_casync(casync, "make", tmp_path / "direct.catar", src)  # the archive the index was cut from
    assert (tmp_path / "x.catar").read_bytes() == (tmp_path / "direct.catar").read_bytes()
    assert_clean_after(sshd, store, before)


# ---- push: casync's make writing to our remote ------------------------------------------------------

def push_servers(store: Path) -> list[int]:
    marker = str(store).encode()
    return processes(lambda argv, _: b"push" in argv and any(marker in a for a in argv))


def test_casync_pushes_a_blob_into_our_remote_and_reads_it_back(casync: str, sshd: Sshd, tmp_path: Path):
    """`casync make --store=host:STORE host:INDEX` with our `push` on the far side: the index is
    the one casync makes locally, every chunk lands verified, and casync extracts it back through
    our pull. A second push finds every chunk there and asks for none."""
    data = make_blob(tmp_path / "blob", seed=5)
    store, index = remote_store(tmp_path), tmp_path / "remote" / "x.caibx"
    before = logins(sshd)
    env = remote_env(sshd, REMOTE_PYDESYNC)
    ok_casync(casync, "make", f"--store=127.0.0.1:{store}", f"127.0.0.1:{index}", tmp_path / "blob", env=env)
    ok_casync(casync, "make", f"--store={tmp_path / 'local.castr'}", tmp_path / "local.caibx",
              tmp_path / "blob")
    assert index.read_bytes() == (tmp_path / "local.caibx").read_bytes()
    assert sorted(p.name for p in store.rglob("*.cacnk")) == \
        sorted(p.name for p in (tmp_path / "local.castr").rglob("*.cacnk"))
    ok_casync(casync, "extract", f"--store=127.0.0.1:{store}", f"127.0.0.1:{index}", tmp_path / "out",
              env=env)
    assert (tmp_path / "out").read_bytes() == data
    ok_casync(casync, "make", f"--store=127.0.0.1:{store}", f"127.0.0.1:{index}", tmp_path / "blob", env=env)
    assert_clean_after(sshd, store, before)
    assert not push_servers(store)
    assert not [p for p in (tmp_path / "remote").iterdir() if p.name.startswith(".")]


def test_casync_pushes_a_tree_and_an_archive_into_our_remote(casync: str, sshd: Sshd, tmp_path: Path):
    """A .caidx with its store, and a .catar, pushed by casync to our remote: untar of either gives
    the tree back (the tree repeats chunks: each is asked for once)."""
    src = tmp_path / "src"
    make_tree(src, repeated=True)
    store, remote = remote_store(tmp_path), tmp_path / "remote"
    env = remote_env(sshd, REMOTE_PYDESYNC)
    ok_casync(casync, "make", f"--store=127.0.0.1:{store}", f"127.0.0.1:{remote / 'x.caidx'}", src, env=env)
    ok_casync(casync, "make", f"127.0.0.1:{remote / 'x.catar'}", src, env=env)
    ok_cli("untar", "-i", "-s", store, remote / "x.caidx", tmp_path / "out1")
    ok_cli("untar", remote / "x.catar", tmp_path / "out2")
    assert snapshot(tmp_path / "out1") == snapshot(src) == snapshot(tmp_path / "out2")
    ok_casync(casync, "make", tmp_path / "direct.catar", src)
    assert (remote / "x.catar").read_bytes() == (tmp_path / "direct.catar").read_bytes()


# ---- push: our client writing to casync's remote and ours -------------------------------------------

@pytest.mark.parametrize("remote", ["casync", "pydesync"])
def test_our_make_pushes_an_index_and_its_chunks(casync: str, sshd: Sshd, tmp_path: Path, remote: str):
    """`make -s ssh://H/STORE ssh://H/INDEX`: the index goes with its chunks in one push (the
    remote asks for those it lacks), as casync's make does; casync extracts the result. A tree
    (`tar -i`) likewise. The index is also read back from its ssh:// location."""
    data = make_blob(tmp_path / "blob", seed=7)
    store, index = remote_store(tmp_path), tmp_path / "remote" / "x.caibx"
    env = remote_env(sshd, "casync" if remote == "casync" else REMOTE_PYDESYNC)
    before = logins(sshd)
    ok_cli("make", "-s", f"ssh://127.0.0.1{store}", f"ssh://127.0.0.1{index}", tmp_path / "blob", env=env)
    ok_cli("make", tmp_path / "local.caibx", tmp_path / "blob")
    assert index.read_bytes() == (tmp_path / "local.caibx").read_bytes()
    ok_casync(casync, "extract", f"--store={store}", index, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    ok_cli("extract", "-s", f"ssh://127.0.0.1{store}", f"ssh://127.0.0.1{index}", tmp_path / "out2", env=env)
    assert (tmp_path / "out2").read_bytes() == data
    src = tmp_path / "src"
    make_tree(src, repeated=True)
    ok_cli("tar", "-i", "-s", f"ssh://127.0.0.1{store}", f"ssh://127.0.0.1{tmp_path / 'remote' / 't.caidx'}",
           src, env=env)
    ok_casync(casync, "extract", f"--store={store}", tmp_path / "remote" / "t.caidx", tmp_path / "tree")
    assert snapshot(tmp_path / "tree") == snapshot(src)
    assert_clean_after(sshd, store, before)
    assert not push_servers(store)
    assert not [p for p in (tmp_path / "remote").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("remote", ["casync", "pydesync"])
def test_indexes_and_stores_alone_over_ssh(casync: str, sshd: Sshd, tmp_path: Path, remote: str):
    """An index alone, written to and read from an ssh:// location; chunks alone into an ssh://
    store with a local index: our remote takes them, casync's takes chunks only with an index,
    which is one clear error (and no local index is written)."""
    data = make_blob(tmp_path / "blob", seed=8)
    env = remote_env(sshd, "casync" if remote == "casync" else REMOTE_PYDESYNC)
    location = f"ssh://127.0.0.1{tmp_path / 'remote' / 'y.caibx'}"
    (tmp_path / "remote").mkdir()
    ok_cli("make", "-s", tmp_path / "local.castr", location, tmp_path / "blob", env=env)
    ok_cli("make", tmp_path / "plain.caibx", tmp_path / "blob")
    assert (tmp_path / "remote" / "y.caibx").read_bytes() == (tmp_path / "plain.caibx").read_bytes()
    ok_cli("extract", "-s", tmp_path / "local.castr", location, tmp_path / "out", env=env)
    assert (tmp_path / "out").read_bytes() == data
    missing = run_cli("extract", "-s", tmp_path / "local.castr", location.replace("y.caibx", "none.caibx"),
                      tmp_path / "out2", env=env, timeout=TIMEOUT)
    assert_clean_error(missing, "index")
    store = tmp_path / "remote" / "alone.castr"
    r = run_cli("make", "-s", f"ssh://127.0.0.1{store}", tmp_path / "z.caibx", tmp_path / "blob", env=env,
                timeout=TIMEOUT)
    if remote == "casync":
        assert_clean_error(r, "takes chunks only with an index")
        assert not (tmp_path / "z.caibx").exists()
    else:
        assert r.returncode == 0, r.stderr
        ok_cli("extract", "-s", store, tmp_path / "z.caibx", tmp_path / "out3")
        assert (tmp_path / "out3").read_bytes() == data
