"""Error classes shared by the library; the CLI turns each into one line on stderr."""

from __future__ import annotations

import os

SHOWN_PATH_HEAD = 200
SHOWN_PATH_TAIL = 600


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def one_line(text: str) -> str:
    """A message as one line: control characters (a newline in a file name from an archive could
    forge a second line) shown as escapes."""
    return text.translate(_CONTROL)


def shown_path(path: str | bytes | os.PathLike) -> str:
    """A path as an error message shows it: decoded, and cut in the middle when very long (a tree
    100,000 levels deep has paths of 200 kB; one line must stay readable), keeping its start and
    the end that names the entry."""
    text = one_line(os.fsdecode(path))
    if len(text) <= SHOWN_PATH_HEAD + SHOWN_PATH_TAIL + 50:
        return text
    cut = len(text) - SHOWN_PATH_HEAD - SHOWN_PATH_TAIL
    return f"{text[:SHOWN_PATH_HEAD]}[...{cut} characters...]{text[-SHOWN_PATH_TAIL:]}"


class PydesyncError(Exception):
    """Base of every error the library raises on purpose (bad input, bad data, missing chunks)."""


class UsageError(PydesyncError):
    """The caller asked for something impossible (bad flag combination, bad size, bad location)."""


class IndexFormatError(PydesyncError):
    """An index file is malformed: bad magic, truncation, offsets out of order, oversized chunk..."""


class ChunkError(PydesyncError):
    """Base of errors about one chunk; carries its id so messages can name it."""

    def __init__(self, chunk_id: object, message: str):
        super().__init__(message)
        self.chunk_id = chunk_id


class ChunkMissing(ChunkError):
    """No store had the chunk. Only this error falls through to the next store in a chain."""

    def __init__(self, chunk_id: object, stores: list[str] | None = None, hint: str = ""):
        """`hint`: what the stores hold instead (a chunk stored encrypted, say), for the user."""
        self.stores = list(stores or [])
        self.hint = hint
        where = f" in {', '.join(self.stores)}" if self.stores else ""
        super().__init__(chunk_id, f"chunk {chunk_id} missing{where}{f' ({hint})' if hint else ''}")


class ChunkInvalid(ChunkError):
    """A stored chunk does not decode, or decodes to data whose digest is not its id."""

    def __init__(self, chunk_id: object, message: str, location: str | None = None):
        self.location = location
        super().__init__(chunk_id, message + (f" ({location})" if location else ""))


class StoreError(PydesyncError):
    """A store cannot be opened or used (not a directory, not writable, unsupported kind).

    `errno` is the system's error number where one caused it: a server answers 503 (try again)
    rather than 500 when the machine ran out of descriptors or memory."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
