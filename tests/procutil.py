"""Starting and stopping the processes tests run against (our servers, sshd, moto, ...) without
races and without betting on how fast anything is.

Ports: `free_port` hands out ports below the kernel's ephemeral range, so no outgoing connection
can be given one between the check and the server's bind, and never the same port twice in one
process; pytest-xdist workers draw from disjoint slices. Our own servers listen on port 0 and say
where in their start-up line (`start_server`), so they need no free port at all.

`HANG_GUARD` is the one bound on waiting for something that must happen (a peer starting, a
process ending). It is not a speed requirement: it only turns a hang into a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# how long a test waits on a peer before calling it a hang (a failure, never a pass); lower it
# with PYDESYNC_HANG_GUARD while hunting a hang
HANG_GUARD = float(os.environ.get("PYDESYNC_HANG_GUARD", "300"))


def _port_range() -> range:
    """This process's slice of the ports below the ephemeral range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, last = 10000, max(10001, low)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(re.sub(r"\D", "", os.environ.get("PYTEST_XDIST_WORKER", "")) or 0)
    size = (last - first) // max(1, workers)
    return range(first + worker * size, first + (worker + 1) * size)


def _port_cycle() -> Iterator[int]:
    ports = _port_range()
    start = (os.getpid() * 7919) % len(ports)  # another run on the machine starts elsewhere
    return itertools.cycle([*ports[start:], *ports[:start]])


_PORTS = _port_cycle()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and no outgoing connection can take."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")  # pragma: no cover (the cycle is endless)


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = HANG_GUARD) -> bool:
    """Whether `proc` accepts connections on 127.0.0.1:port (False if it exited first)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return True
        time.sleep(0.05)
    return False


def default_signals() -> None:
    """A Popen preexec_fn: SIGINT and SIGTERM at their defaults, as in a command started from a
    shell. pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored in children,
    so a test that interrupts a child must start it with this."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not end; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_server(kind: str, *args: str | os.PathLike[str], stderr: Path,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """Start `pydesync KIND ARGS -l 127.0.0.1:0`; (process, port) once its start-up line says where
    it listens. Its stderr goes to the file `stderr`. A server that exits first is an AssertionError
    carrying what it said."""
    with open(stderr, "wb") as err:
        argv = [sys.executable, "-m", "pydesync", kind, *map(str, args), "-l", "127.0.0.1:0"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=env, preexec_fn=default_signals)
    serving = re.compile(rf"^{kind}: serving .* at https?://127\.0\.0\.1:(\d+)", re.M)
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        match = serving.search(stderr.read_text(errors="replace"))
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    stop(proc)
    raise AssertionError(f"{kind} did not start: {stderr.read_text(errors='replace')[-2000:]}")


def processes(match: Callable[[list[bytes], int], bool]) -> list[int]:
    """Pids of live processes whose argv (and parent pid) `match(argv, ppid)` accepts, from /proc.
    Zombies have no command line and never match."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if argv != [b""] and match(argv, ppid):
            pids.append(int(entry))
    return pids


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return all the server answers until it closes the
    connection (the request must make it close: `Connection: close`, or an error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def wait_until_written(partial: Path) -> None:
    """Until an extract stalled by a Gate has written a chunk of what it was answered (its partial
    output is sparse: blocks appear as chunks land)."""
    deadline = time.monotonic() + HANG_GUARD
    while not (partial.exists() and partial.stat().st_blocks > 0):
        assert time.monotonic() < deadline, "no chunk was written"
        time.sleep(0.01)


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler for small test servers: JSON answers, no log lines."""

    def reply_json(self, payload: object, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve_in_thread(handler: type[BaseHTTPRequestHandler],
                    tls: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP(S) server on 127.0.0.1 answering with `handler`: (server, base URL); the
    caller calls server.shutdown() and server.server_close()."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
