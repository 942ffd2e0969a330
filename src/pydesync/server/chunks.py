"""chunk-server: a store (or a chain behind a cache) over HTTP at `/<4 hex>/<64 hex><extension>`.

GET and HEAD always; PUT with `writable`, where an upload is decoded and
checked against its id before it is stored. The wire format is a converter
stack (store.converters): `.cacnk` by default, the raw chunk (no suffix) with
`uncompressed`, and an encryption layer on top with `--encryption*`. Chunks
are converted between the stored and the served format on the fly, undoing
and redoing only the layers after the ones both share (a compressed store
served encrypted is only encrypted). casync's HTTP helper and desync's HTTP
store both talk to this.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from urllib.parse import unquote

from ..codec import CodecError
from ..digest import ChunkId, digest_of
from ..errors import ChunkInvalid, ChunkMissing, PydesyncError
from ..index import parse_index
from ..remotesync import SyncError, check_wishlist_length, index_syncinfo, send
from ..store.base import Store, verify_chunk
from ..store.converters import COMPRESSED, PLAIN, Converters
from .common import App, Exchange, target_path
from .http11 import Request
from .indexes import valid_index_name
from .metrics import Metrics

log = logging.getLogger(__name__)  # (the CLI shows these lines on stderr)

SYNC_PREFIX = "/sync/"


def _is_sync(req: Request) -> bool:
    """A request for remotesync's /sync/ (in origin or absolute form, as the dispatcher sees it)."""
    target = req.target
    if target[:1] == "/":
        return target.startswith(SYNC_PREFIX)
    return (target_path(target) or "").startswith(SYNC_PREFIX)


OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
_CHUNK_PATH = re.compile(r"^/([0-9a-f]{4})/([0-9a-f]{64})(.*)$")


class ChunkServer(App):
    """The request logic for every method; `server()` binds it to listening sockets."""

    name = "chunk-server"

    def __init__(self, upstream: Store, writable: bool = False, uncompressed: bool = False,
                 skip_verify_read: bool = True, skip_verify_write: bool = False,
                 wire: Converters | None = None, sync_indexes: str | None = None,
                 metrics: Metrics | None = None):
        """`wire` (the format clients exchange, e.g. with encryption) overrides `uncompressed`;
        `sync_indexes`, a folder of indexes, enables wishlist transfers at /sync/<index name>."""
        self.upstream = upstream
        self.metrics = metrics or Metrics(None)
        self.sync_indexes = sync_indexes
        self.writable = writable
        self.wire = wire if wire is not None else (PLAIN if uncompressed else COMPRESSED)
        self.suffix = self.wire.extension
        self.skip_verify_read = skip_verify_read
        self.skip_verify_write = skip_verify_write

    # ---- requests ------------------------------------------------------------------------------
    def quick(self, req: Request) -> bool:
        """Reads from a local store are answered on the event loop (a stat, or a file read)."""
        return req.method in ("GET", "HEAD") and self.upstream.local_files and not _is_sync(req)

    def streams(self, req: Request) -> bool:
        """A wishlist POST streams the chunks asked for on a thread of its own."""
        return req.method == "POST" and self.sync_indexes is not None and _is_sync(req)

    def _dispatch(self, req: Exchange) -> None:
        if req.target_path.startswith(SYNC_PREFIX) and self.sync_indexes is not None:
            self._sync(req)
            return
        super()._dispatch(req)

    def _sync(self, req: Exchange) -> None:
        """One-round-trip transfer of an index's chunks (remotesync, our mode): GET gives the
        SyncInfo, POST (the whole wishlist as body, `Connection: close`) streams the chunks asked
        for in the served format, each as a varint length and the bytes."""
        name = unquote(req.target_path[len(SYNC_PREFIX):])
        if req.command not in ("GET", "HEAD", "POST"):
            req.reply(405, b"only GET and POST are supported here\n")
            return
        assert self.sync_indexes is not None
        if not valid_index_name(name):
            req.reply(400, b"invalid index name\n")
            return
        try:
            with open(os.path.join(self.sync_indexes, name), "rb") as f:
                raw = f.read()
            index = parse_index(raw, name)
        except FileNotFoundError:
            req.reply(404, b"no such index\n")
            return
        except (OSError, PydesyncError) as e:
            req.reply(500, f"cannot read index {name}: {e}\n".encode())
            return
        info = index_syncinfo(raw, [(bytes(c.id), c.size) for c in index], index.sizes.max)
        if req.command != "POST":
            req.reply(200, info.to_json(), "application/json")
            return
        if "close" not in (req.header("connection") or "").lower():
            req.reply(400, b"Connection: close required\n")
            return
        wish = req.read_body()
        if wish is None:
            return
        try:
            check_wishlist_length(wish, info.positions)
        except SyncError as e:
            req.reply(400, f"{e}\n".encode())
            return
        write = req.stream()
        try:
            send(info, wish, lambda c: self.wire_bytes(ChunkId(c.key)), write)
        except (PydesyncError, OSError) as e:  # the client sees the stream end early
            log.warning(f"chunk-server: sync of {name}: {e}")

    def handle(self, req: Exchange) -> None:
        chunk_id = self._parse(req)
        if chunk_id is None:
            return
        if req.command == "PUT":
            self._put(req, chunk_id)
            return
        try:
            if req.command == "HEAD":
                req.reply(200 if self.upstream.has(chunk_id) else 404)
            elif not self._send_file(req, chunk_id):
                req.reply(200, self.wire_bytes(chunk_id), "application/octet-stream")
        except ChunkMissing:
            req.reply(404, f"chunk {chunk_id} not found\n".encode())
        except (PydesyncError, OSError) as e:
            log.warning(f"chunk-server: {req.command} {chunk_id}: {e}")
            if getattr(e, "errno", None) in OUT_OF_RESOURCES:  # the machine, not the request
                req.reply(503, b"server out of resources, try again later\n")
            else:
                req.reply(500, b"internal server error\n")

    def _parse(self, req: Exchange) -> ChunkId | None:
        path = unquote(req.target_path)
        if not path.endswith(self.suffix):
            req.reply(400, b"invalid chunk extension, verify compression and encryption settings\n")
            return None
        match = _CHUNK_PATH.match(path)
        extra = match.group(3)[: len(match.group(3)) - len(self.suffix)] if match else ""
        if "." in extra:  # another extension before (or instead of) ours: another format
            req.reply(400, f"requested chunk with an unexpected file extension, this server expects "
                           f"'<chunkid>{self.suffix}', verify compression and encryption settings\n".encode())
            return None
        if not match or extra or match.group(1) != match.group(2)[:4]:
            req.reply(400, f"expected format '/<prefix>/<chunkid>{self.suffix}'\n".encode())
            return None
        return ChunkId(match.group(2))

    def _send_file(self, req: Exchange, chunk_id: ChunkId) -> bool:
        """Serve a local store's file as it is (sendfile) when its format is the wire format."""
        if not self.upstream.local_files or not self.skip_verify_read:
            return False
        fd, size, stored_format = self.upstream.open_stored(chunk_id)
        try:
            if stored_format != self.wire:
                return False
            req.reply_file(fd, size)
            return True
        finally:
            os.close(fd)

    def wire_bytes(self, chunk_id: ChunkId) -> bytes:
        """The chunk as served: the stored file itself when formats agree and reads are trusted,
        else converted from the stored format through the layers the two do not share."""
        if self.skip_verify_read:
            stored, stored_format = self.upstream.get_stored(chunk_id)
            try:
                return stored_format.convert(stored, self.wire)
            except CodecError as e:
                raise ChunkInvalid(chunk_id, f"invalid chunk {chunk_id}: {e}",
                                   self.upstream.location) from None
        return self.wire.encode(self.upstream.get(chunk_id))

    def _put(self, req: Exchange, chunk_id: ChunkId) -> None:
        if not self.writable:
            req.reply(400, b"writing to upstream chunk store is not enabled\n")
            return
        body = req.read_body()
        if body is None:
            return
        try:
            data = self.wire.decode(body)
            if not self.skip_verify_write:
                verify_chunk(chunk_id, data, None, "upload")
        except CodecError as e:
            self.metrics.upload_rejected()
            req.reply(400, f"invalid chunk {chunk_id}: {e}\n".encode())
            return
        except ChunkInvalid:
            self.metrics.upload_rejected()
            req.reply(400, f"chunk id {chunk_id} does not match its hash {digest_of(data)}\n".encode())
            return
        try:
            self.upstream.put(chunk_id, data)
        except (PydesyncError, OSError) as e:
            log.warning(f"chunk-server: PUT {chunk_id}: {e}")
            req.reply(500, b"internal server error\n")
            return
        req.reply(200)
