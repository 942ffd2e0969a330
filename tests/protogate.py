"""A remote side of casync's protocol that can be held at a chosen chunk: run by sshd as
CASYNC_REMOTE_PATH="python3 protogate.py LOG GATE ALLOW REMOTE...", it runs REMOTE (casync, or our
`pydesync`) with the client's standard input and passes its answers on message by message,
logging the id of every CHUNK it passes (one hex line each, in LOG: what the client fetched).

After ALLOW chunk messages (-1: no limit) it stops passing anything on, creates GATE/waiting, and
waits until the test opens the FIFO GATE/release and closes it again; then it goes on (the
client is gone by then, so it ends on a broken pipe, its REMOTE with it). No wall clock: a held
session waits for as long as the test wants.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

CHUNK = 0x5213DD180A84BC8C


def read_exactly(f, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            return data
        data += more
    return data


def hold(gate: str) -> None:
    with open(os.path.join(gate, "waiting"), "w"):
        pass
    with open(os.path.join(gate, "release"), "rb") as release:  # (blocks until the test opens it)
        release.read()


def main() -> int:
    log_path, gate, allow = sys.argv[1], sys.argv[2], int(sys.argv[3])
    remote = subprocess.Popen(sys.argv[4:], stdout=subprocess.PIPE)  # (our stdin and stderr)
    out = sys.stdout.buffer
    passed = 0
    try:
        with open(log_path, "a") as log:
            while len(head := read_exactly(remote.stdout, 16)) == 16:
                size, kind = struct.unpack("<QQ", head)
                body = read_exactly(remote.stdout, size - 16)
                if kind == CHUNK and passed == allow:
                    hold(gate)
                out.write(head + body)
                out.flush()
                if kind == CHUNK:
                    passed += 1
                    log.write(body[8:40].hex() + "\n")
                    log.flush()
            out.write(head)
            out.flush()
    except BrokenPipeError:  # the client is gone
        remote.kill()
    remote.stdout.close()
    remote.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
