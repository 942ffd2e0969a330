"""sync-serve: files offered for CAFS's wishlist transfer over HTTP (httpsync's binding).

`GET /<name>` answers the file's SyncInfo as JSON. `POST /<name>` needs `Connection: close`
(400 otherwise, as httpsync); its body is the wishlist (chunked, as CAFS's client sends it
while it reads, or with a Content-Length, as ours sends it whole) and the answer streams the
requested chunks as soon as their bits arrive, until the server closes the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..remotesync import ServedFile, SyncError, wishlist_size
from .common import ServerOptions, bind
from .http11 import Http11Server, Request, Service
from .metrics import Metrics

log = logging.getLogger(__name__)  # (the CLI shows these lines on stderr)


class SyncApp:
    """The requests of sync-serve: GET answers a file's SyncInfo, POST streams its chunks."""

    name = "sync-serve"

    def __init__(self, files: dict[str, ServedFile]):
        self.files = files  # URL path -> file

    def served(self, req: Request) -> ServedFile | None:
        return self.files.get(req.target.split("?", 1)[0])

    def streams(self, req: Request) -> bool:
        """A POST reads its wishlist while it streams chunks: on a thread of its own."""
        return req.method == "POST"

    def body_limit(self, req: Request) -> int:
        """A wishlist's length is known: one more byte is already too long."""
        served = self.served(req)
        return 0 if served is None else wishlist_size(served.info.positions) + 1

    def __call__(self, req: Request) -> None:
        conn = req._conn
        served = self.served(req)
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
        write = conn.reply_stream(req)
        try:
            served.stream(body_reader(req), write)
        except (SyncError, ValueError) as e:
            log.warning(f"sync-serve: {req.target}: {e}")


def body_reader(req: Request) -> Callable[[int], bytes]:
    """read(n) over the request body as it arrives (chunked, as CAFS's client sends it while it
    reads, or with a Content-Length); b"" at its end. The server has bounded its length."""
    pieces = req.body_pieces()
    pending = b""

    def read(n: int) -> bytes:
        nonlocal pending
        while not pending:
            piece = next(pieces, None)
            if piece is None:
                return b""
            pending = piece
        out, pending = pending[:n], pending[n:]
        return out
    return read


def sync_server(files: dict[str, ServedFile], options: ServerOptions, metrics: Metrics | None = None
                ) -> Http11Server:
    """sync-serve's server on the listen addresses of `options`."""
    app = SyncApp(files)
    return bind(Service(app.name, app, streams=app.streams, body_limit=app.body_limit), options, metrics)
