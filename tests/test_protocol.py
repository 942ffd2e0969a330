"""casync's protocol both ways: our `pull` for casync clients, our ssh:// store against casync's pull.

A stand-in `ssh` (CASYNC_SSH_PATH) runs the remote command locally, as casync's own capture tool does;
the real-sshd tests live with the SFTP store.
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

from pydesync import protocol as P

FAKE_SSH = Path(__file__).resolve().parent.parent / "scripts" / "fake-ssh"


@pytest.fixture
def fake_ssh() -> Path:
    return FAKE_SSH


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
    """No process whose command line mentions `marker` is still running (checked briefly)."""
    for _ in range(20):
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.strip()
        if not found:
            return True
        time.sleep(0.1)
    return False


def test_pull_answers_recorded_client_once_per_chunk(casync_data: Path):
    """casync's client asked for 2a07... twice (low, then high priority); it gets it once."""
    client = (casync_data / "protocol" / "pull-store-only.c2s.bin").read_bytes()
    r = subprocess.run([sys.executable, "-m", "pydesync", "pull", "-", "-", "-",
                        str(casync_data / "blob-min.castr")], input=client, capture_output=True, timeout=60)
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
                        str(casync_data / "blob-min.castr")], input=hello, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = messages(r.stdout)
    assert got[0][1] == struct.pack("<Q", P.READABLE_STORE | P.READABLE_INDEX)
    assert b"".join(body for kind, body in got if kind == P.INDEX) == index.read_bytes()
    assert got[-1][0] == P.INDEX_EOF
    bad = P.encode(P.HELLO, struct.pack("<Q", P.PULL_ARCHIVE))
    r = subprocess.run([sys.executable, "-m", "pydesync", "pull", "-", "-", "-",
                        str(casync_data / "blob-min.castr")], input=bad, capture_output=True, timeout=60)
    assert r.returncode != 0 and "Error:" in r.stderr.decode()
    assert messages(r.stdout)[-1][0] == P.ABORT


def test_casync_client_reads_from_our_pull(casync, casync_data: Path, casync_inputs: Path,
                                           fake_ssh: Path, tmp_path: Path):
    store = casync_data / "blob.castr"
    out = tmp_path / "out"
    env = {**os.environ, **remote_env(fake_ssh)}
    index = casync_data / "blob.caibx"
    subprocess.run([casync, "extract", f"--store=localhost:{store}", str(index), str(out)],
                   check=True, env=env, timeout=120, capture_output=True)
    assert out.read_bytes() == (casync_inputs / "blob.bin").read_bytes()
    out2 = tmp_path / "out2"
    subprocess.run([casync, "extract", f"--store=localhost:{store}", f"localhost:{index}", str(out2)],
                   check=True, env=env, timeout=120, capture_output=True)
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
