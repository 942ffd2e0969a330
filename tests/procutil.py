"""Starting and stopping the server processes tests run against (sshd, moto, ...)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 30) -> bool:
    """Whether `proc` accepts connections on 127.0.0.1:port within `timeout` (False if it exited)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
