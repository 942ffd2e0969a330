"""index-server: index files of a local directory over HTTP, by name (the last path element).

GET re-serialises a parsed index (a file that is not an index is 400), HEAD
says whether it opens, PUT (with `writable`) stores a body only if it parses
as an index (else 415). Names are plain file names: anything that could
climb out of the directory (a `..` segment anywhere in the path, a backslash,
encoded or not) is 400.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import unquote

from ..errors import IndexFormatError
from ..fsutil import write_bytes_atomic
from ..index import MAX_INDEX_BYTES, parse_index
from .common import App, Exchange
from .http11 import Request

log = logging.getLogger(__name__)  # (the CLI shows these lines on stderr)


def valid_index_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


class IndexServer(App):
    name = "index-server"

    def __init__(self, directory: str, writable: bool = False):
        if not os.path.isdir(directory):
            raise IndexFormatError(f"index store {directory} is not a directory")
        self.directory = directory
        self.writable = writable

    def body_limit(self, req: Request) -> int:
        return MAX_INDEX_BYTES

    def handle(self, req: Exchange) -> None:
        raw = req.target_path
        name = unquote(raw.rsplit("/", 1)[-1])
        decoded = unquote(raw)
        if not valid_index_name(name) or "\\" in decoded or ".." in decoded.split("/"):
            req.reply(400, b"invalid index name\n")
            return
        path = os.path.join(self.directory, name)
        if req.command == "PUT":
            self._put(req, path)
            return
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            req.reply(404, b"index not found\n")
            return
        except OSError:
            req.reply(400, b"failed to retrieve index\n")
            return
        try:
            body = parse_index(data, name).to_bytes()
        except IndexFormatError:
            req.reply(400, b"failed to retrieve index\n")
            return
        req.reply(200, body, "application/octet-stream")

    def _put(self, req: Exchange, path: str) -> None:
        if not self.writable:
            req.reply(400, b"writing to upstream index store is not enabled\n")
            return
        body = req.read_body(MAX_INDEX_BYTES)
        if body is None:
            return
        try:
            parse_index(body)
        except IndexFormatError:
            req.reply(415, b"not a valid index\n")
            return
        try:
            write_bytes_atomic(path, body)
        except OSError as e:
            log.warning(f"index-server: PUT {path}: {e}")
            req.reply(500, b"internal server error\n")
            return
        req.reply(200)
