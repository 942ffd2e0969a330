"""sync-serve: files offered for CAFS's wishlist transfer over HTTP (httpsync's binding).

`GET /<name>` answers the file's SyncInfo as JSON. `POST /<name>` needs `Connection: close`
(400 otherwise, as httpsync); its body is the wishlist (chunked, as CAFS's client sends it
while it reads, or with a Content-Length, as ours sends it whole) and the answer streams the
requested chunks as soon as their bits arrive, until the server closes the connection.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..netio import chunked_pieces, decimal
from ..remotesync import ServedFile, SyncError, wishlist_size
from .http11 import Http11Server, Request


class SyncApp:
    def __init__(self, files: dict[str, ServedFile]):
        self.files = files  # URL path -> file

    def __call__(self, req: Request) -> None:
        conn = req._conn
        served = self.files.get(req.target.split("?", 1)[0])
        if req.method not in ("GET", "HEAD", "POST"):
            conn.reply(req, 405, b"method not allowed\n")
            return
        if served is None:
            conn.reply(req, 404, b"no such file\n")
            return
        if req.method != "POST":
            conn.reply(req, 200, served.info.to_json(), "application/json")
            return
        if "close" not in req.headers.get("connection", "").lower():
            conn.reply(req, 400, b"Connection: close required\n")
            return
        req.body_read = True
        write = conn.reply_stream(req)
        try:
            served.stream(body_reader(req, wishlist_size(served.info.positions) + 1), write)
        except (SyncError, ValueError) as e:
            sys.stderr.write(f"sync-serve: {req.target}: {e}\n")


def body_reader(req: Request, limit: int) -> Callable[[int], bytes]:
    """read(n) over the request body, chunked or with a Content-Length; no more than `limit`
    bytes are taken (a wishlist's length is known: more is refused as too long anyway)."""
    reader = req._conn.reader
    if "chunked" in req.headers.get("transfer-encoding", "").lower():
        pieces = chunked_pieces(reader, limit)
        pending = b""

        def read_chunked(n: int) -> bytes:
            nonlocal pending
            if not pending:
                try:
                    pending = bytes(next(pieces, b""))
                except ConnectionResetError:
                    pending = b""  # the wishlist ends early: "wishlist too short"
            out, pending = pending[:n], pending[n:]
            return out
        return read_chunked
    left = min(decimal(req.headers.get("content-length", "0")) or 0, limit)

    def read_length(n: int) -> bytes:
        nonlocal left
        if left <= 0:
            return b""
        data = reader.read_some(min(n, left))
        left -= len(data)
        return data
    return read_length


def sync_servers(files: dict[str, ServedFile], address: tuple[str, int]) -> Http11Server:
    return Http11Server(address, SyncApp(files))
