"""Socket plumbing shared by the HTTP client (store/http_fast) and server (server/http11).

Why: a chunk store is tens of thousands of small requests per gigabyte, so per-request
system calls and allocations add up on both ends. Python's socket timeouts cost a poll()
before every recv and an ioctl on every settimeout(); plain sockets here use the kernel's
SO_RCVTIMEO/SO_SNDTIMEO instead, set once per connection, so a read is one recv_into
into a buffer that is reused. Whole-request limits are deadlines checked between reads
(a slow drip ends at most one read timeout after its deadline). TLS sockets keep
Python's timeouts, which the ssl module needs.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator

_TIMEVAL = struct.Struct("@ll")
MAX_TRAILERS = 100
PREALLOCATE = 16 << 20  # read_exact allocates a declared length up to this at once


def decimal(text: str) -> int | None:
    """A header's non-negative decimal number, or None. ASCII digits only: str.isdigit() also
    accepts characters such as "²" that int() refuses."""
    return int(text) if text.isascii() and text.isdigit() else None


def set_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """Blocking I/O on `sock` that fails with TimeoutError after `seconds` without progress."""
    if isinstance(sock, ssl.SSLSocket) or seconds is None:
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    whole = int(seconds)
    value = _TIMEVAL.pack(whole, int((seconds - whole) * 1e6) or (0 if whole else 1))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class SocketReader:
    """Buffered reading from a socket: heads up to a marker, bodies of a known length.

    `deadline` (time.monotonic) bounds a whole exchange; None = only the socket's timeout.
    Methods return None (or a short result) at end of stream; callers decide what that means.
    """

    def __init__(self, sock: socket.socket, size: int = 65536):
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.deadline: float | None = None

    def buffered(self) -> int:
        """Bytes received and not consumed yet."""
        return self._end - self._start

    def peek(self) -> memoryview:
        """The bytes received and not consumed yet (valid until the next read)."""
        return self._view[self._start:self._end]

    def _recv_into(self, view: memoryview) -> int:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError("timed out")
        try:
            return self.sock.recv_into(view)
        except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from None

    def fill(self) -> bool:
        """Receive more into the buffer (moving or growing it); False at end of stream."""
        if self._end == len(self._buf):
            have = self._end - self._start
            if self._start:
                self._buf[:have] = self._buf[self._start:self._end]
            else:  # the view must go before the buffer can grow (BufferError otherwise)
                self._view.release()
                self._buf.extend(bytes(len(self._buf)))
                self._view = memoryview(self._buf)
            self._start, self._end = 0, have
        n = self._recv_into(self._view[self._end:])
        self._end += n
        return n > 0

    def take_until(self, marker: bytes, limit: int) -> bytes | None:
        """Bytes before `marker` if the buffer holds it (consumed with it), else None; never reads.
        Raises ValueError when more than `limit` bytes are buffered without the marker."""
        at = self._buf.find(marker, self._start, self._end)
        if at < 0 or at - self._start > limit:
            if at - self._start > limit or self._end - self._start > limit:
                raise ValueError("too long without a terminator")
            return None
        out = bytes(self._view[self._start:at])
        self._start = at + len(marker)
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def read_until(self, marker: bytes, limit: int) -> bytes | None:
        """Bytes before `marker` (consumed with it); None at end of stream first.
        Raises ValueError when more than `limit` bytes come without the marker."""
        while True:
            out = self.take_until(marker, limit)
            if out is not None:
                return out
            if not self.fill():
                return None

    def fill_nowait(self) -> bool | None:
        """fill() on a non-blocking socket: True if bytes came, False at end of stream, None if
        nothing has arrived yet."""
        try:
            return self.fill()
        except TimeoutError:
            return None

    def read_some(self, n: int) -> bytes:
        """Up to n bytes: what is buffered, else one receive; b"" at end of stream."""
        if self._start == self._end and not self.fill():
            return b""
        take = min(n, self._end - self._start)
        out = bytes(self._view[self._start:self._start + take])
        self._start += take
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def read_exact(self, n: int) -> bytearray | None:
        """Exactly n bytes (one allocation, received straight into it); None if the stream ends.
        Beyond PREALLOCATE bytes the buffer grows as data arrives, so a length a peer declares
        but never sends costs no memory."""
        if n > PREALLOCATE:
            return self._read_growing(n)
        out = bytearray(n)
        have = min(n, self._end - self._start)
        out[:have] = self._view[self._start:self._start + have]
        self._start += have
        if self._start == self._end:
            self._start = self._end = 0
        view = memoryview(out)
        while have < n:
            got = self._recv_into(view[have:])
            if not got:
                return None
            have += got
        return out

    def _read_growing(self, n: int) -> bytearray | None:
        out = bytearray()
        while len(out) < n:
            piece = self.read_exact(min(PREALLOCATE, n - len(out)))
            if piece is None:
                return None
            out += piece
        return out

    def read_to_close(self, limit: int) -> bytes:
        """Everything until the peer closes. Raises ValueError past `limit` bytes."""
        parts = [bytes(self._view[self._start:self._end])]
        self._start = self._end = 0
        total = len(parts[0])
        while True:
            n = self._recv_into(self._view)
            if not n:
                return b"".join(parts)
            total += n
            if total > limit:
                raise BodyTooLong(f"longer than {limit} bytes")
            parts.append(bytes(self._view[:n]))


class BodyTooLong(ValueError):
    """A body past the reader's limit."""


def chunked_pieces(reader: SocketReader, limit: int | None = None) -> Iterator[bytearray]:
    """The pieces of a chunked-encoded body, as they arrive (trailers skipped). Raises ValueError
    on malformed framing or past `limit` bytes in all, and ConnectionResetError if the stream
    ends inside it."""
    total = 0
    while True:
        line = reader.read_until(b"\r\n", 1024)
        if line is None:
            raise ConnectionResetError("connection closed inside a chunked body")
        digits = line.split(b";", 1)[0].strip()
        if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
            raise ValueError("malformed chunked encoding")
        size = int(digits, 16)
        if size == 0:
            for _ in range(MAX_TRAILERS):
                trailer = reader.read_until(b"\r\n", 8192)
                if not trailer:  # the empty line ends the body (None: closed, as good as ended)
                    return
            raise ValueError("too many trailers after a chunked body")
        total += size
        if limit is not None and total > limit:
            raise BodyTooLong(f"chunked body longer than {limit} bytes")
        data = reader.read_exact(size)
        end = reader.read_exact(2)
        if data is None or end is None:
            raise ConnectionResetError("connection closed inside a chunked body")
        if end != b"\r\n":
            raise ValueError("malformed chunked encoding")
        yield data


def send_parts(sock: socket.socket, head: bytes, body: bytes | bytearray | memoryview) -> None:
    """head + body in one system call where possible (no copy into one buffer)."""
    if not body:
        sock.sendall(head)
        return
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(head + bytes(body))
        return
    try:
        sent = sock.sendmsg([head, body])
    except (BlockingIOError, ssl.SSLWantWriteError):
        raise TimeoutError("timed out") from None
    if sent < len(head):
        sock.sendall(memoryview(head)[sent:])
        sent = len(head)
    if sent - len(head) < len(body):
        sock.sendall(memoryview(body)[sent - len(head):])
