"""A throwaway sshd on 127.0.0.1 with keys made for the run, for tests and bench/.

Key authentication only, sftp through internal-sftp. The `ssh` wrapper it writes is
the real ssh with a client config (-F) that reaches and trusts this server; set it as
CASYNC_SSH_PATH. `Host 127.0.0.1` carries the port, so `ssh://127.0.0.1/path` and
casync's `127.0.0.1:/path` both reach it; `pydesync-noport` is an alias without one.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from procutil import HANG_GUARD, free_port, stop, wait_listening

import pydesync

# The remote `python -m pydesync` runs in sshd's environment, not ours: point it at the very package
# this test process imports, so both ends of the connection run the same code.
PYDESYNC_SRC = str(Path(pydesync.__file__).resolve().parent.parent)
REMOTE_PYDESYNC = f"env PYTHONPATH={shlex.quote(PYDESYNC_SRC)} {shlex.quote(sys.executable)} -m pydesync"


class SshdFailed(RuntimeError):
    """sshd did not start (the message carries the end of its log)."""


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers often lack IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def sshd_binaries() -> tuple[str, str | None, str | None]:
    """(sshd, ssh, ssh-keygen) paths; None for a client tool that is missing."""
    return shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh"), shutil.which("ssh-keygen")


@contextlib.contextmanager
def throwaway_sshd(d: Path) -> Iterator[tuple[int, str]]:
    """Start sshd -D with its files in `d`; yields (port, ssh wrapper path); stops it after."""
    binary, ssh, keygen = sshd_binaries()
    assert ssh is not None and keygen is not None
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)],
                       check=True, timeout=HANG_GUARD)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "known_hosts").write_text("pydesync-test-sshd " + (d / "host_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\n{'ListenAddress ::1' + chr(10) if ipv6_loopback() else ''}"
        f"HostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\n"
        "PermitRootLogin yes\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nSubsystem sftp internal-sftp\n"
        "PidFile none\nUseDNS no\nMaxStartups 200\nMaxSessions 100\nLogLevel INFO\n")
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1\n    Port {port}\nHost pydesync-noport\n    HostName 127.0.0.1\nHost *\n"
        f"    BatchMode yes\n    IdentityFile {d}/client_key\n    IdentitiesOnly yes\n"
        f"    HostKeyAlias pydesync-test-sshd\n    UserKnownHostsFile {d}/known_hosts\n"
        "    GlobalKnownHostsFile /dev/null\n    StrictHostKeyChecking yes\n    CheckHostIP no\n"
        "    ConnectTimeout 10\n")
    wrapper = d / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {ssh} -F {d}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if not wait_listening(proc, port, 15):
                raise SshdFailed(f"sshd did not start: {(d / 'sshd.log').read_text(errors='replace')[-500:]}")
            yield port, str(wrapper)
        finally:
            stop(proc)
