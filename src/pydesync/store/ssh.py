"""`ssh://[user@]host[:port]/path` stores and index locations: casync's protocol over ssh.

Each session runs `$CASYNC_SSH_PATH` (default ssh) with the remote command
`$CASYNC_REMOTE_PATH pull - - - '<path>'` (default casync; `pydesync` or
`desync` work too). Up to `concurrency` sessions run at once, started on
demand; every chunk received is verified. Sessions end on close(), on errors
and at interpreter exit, so no ssh process outlives the command. A remote that
owes answers and sends nothing for the store's `timeout` is an error (casync
and desync wait forever).

Writes go as casync's make sends them: chunks put into the store wait in a local
spool (a temporary directory); `flush` pushes them with `push - - INDEX STORE`
together with the index when it goes to the same host (the remote asks only for
the chunks it lacks; casync's remote takes chunks no other way), or alone with
`push - - - STORE` (our remote). Index locations are read with `pull - - INDEX -`
and written with `push - - INDEX -`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from ..codec import CodecError
from ..digest import ChunkId
from ..errors import ChunkInvalid, ChunkMissing, StoreError, UsageError
from ..index import Index
from ..parallel import ordered_map, workers_for
from ..protocol import (
    PUSH_CHUNKS,
    PUSH_INDEX,
    PUSH_INDEX_CHUNKS,
    AlreadyAsked,
    Channel,
    ProtocolError,
    PullSession,
    PushClient,
    decode_payload,
    read_index_stream,
)
from .base import Store, close_at_exit, verify_chunk
from .local import LocalStore
from .options import StoreOptions
from .registry import StoreKind, location_scheme

MAX_SESSIONS = 2
T = TypeVar("T")



def parse_location(location: str) -> tuple[str, int | None, str]:
    """(destination, port, path) of `ssh://[user@]host[:port]/path`; UsageError if malformed."""
    parts = urlsplit(location)
    host = parts.hostname or ""
    if not host or host.startswith("-"):
        raise UsageError(f"invalid ssh location '{location}'")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid port in ssh location '{location}'") from None
    return (f"{parts.username}@{host}" if parts.username else host), port, unquote(parts.path) or "/"


def remote_argv(destination: str, port: int | None, verb: str, archive: str | None = None,
                index: str | None = None, store: str | None = None) -> list[str]:
    """ssh's argv running casync's remote `verb - ARCHIVE INDEX STORE` ('-' for what is not used)."""
    ssh = os.environ.get("CASYNC_SSH_PATH", "ssh")
    remote = os.environ.get("CASYNC_REMOTE_PATH", "casync")
    slots = " ".join(shlex.quote(x) if x else "-" for x in (archive, index, store))
    return [ssh, *(["-p", str(port)] if port else []), "--", destination, f"{remote} {verb} - {slots}"]


class _Remote:
    """One ssh process running a remote verb, its messages, and the last lines it wrote to stderr."""

    def __init__(self, argv: list[str], peer: str, timeout: float | None):
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0)
        except OSError as e:
            raise StoreError(f"cannot run {argv[0]}: {e.strerror}") from None
        self.errors: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.peer = peer
        self.channel = Channel(self.proc.stdout, self.proc.stdin, peer, timeout)  # type: ignore[arg-type]  # (pipes: opened with PIPE)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(line)
            del self.errors[:-5]

    def stderr_text(self) -> str:
        text = b" ".join(line.strip() for line in self.errors).decode("utf-8", "replace").strip()
        return f" ({text})" if text else ""

    def failed(self, error: BaseException) -> StoreError:
        """A session's error as the store reports it, the remote's own words added; ends it."""
        self.end(kill=True)
        text = str(error)
        if not text.startswith(self.peer):
            text = f"{self.peer}: {text}"
        return StoreError(f"{text}{self.stderr_text()}")

    def end(self, kill: bool = False) -> None:
        """Close the pipes and make sure the process is gone."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=0.5 if kill else 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Session(_Remote):
    """A pull session carrying many chunk requests at once."""

    def __init__(self, argv: list[str], peer: str, timeout: float | None):
        super().__init__(argv, peer, timeout)
        self.users = 1  # threads that picked it and have not finished with it (the store's lock)
        try:
            self.pull = PullSession(self.channel)
        except (ProtocolError, OSError) as e:
            raise self.failed(e) from None

    def end(self, kill: bool = False) -> None:
        """Say goodbye (unless killing), then close."""
        if not kill:
            with contextlib.suppress(OSError, ProtocolError, AttributeError):
                self.pull.goodbye()
        super().end(kill)


class SshStore(Store):
    """A chunk store on the far side of an ssh connection: read through pull sessions, written by
    pushes of what was spooled (see the module docstring)."""

    remote = True
    streams = True

    def __init__(self, location: str, options: StoreOptions | None = None):
        self.location = location
        self.options = options or StoreOptions()
        if self.options.encryption:
            raise UsageError(f"encryption is not supported by ssh stores ({location})")
        self.destination, self.port, self.path = parse_location(location)
        self._spool: LocalStore | None = None  # chunks put, waiting for flush
        self._spooled: set[bytes] = set()
        self._sessions: list[_Session] = []
        self._lock = threading.Lock()
        self._turn = itertools.count()
        # Sessions carry many requests at once; a few suffice, each is a process on the remote.
        self._max_sessions = max(1, min(self.options.concurrency, MAX_SESSIONS))
        close_at_exit(self)

    def _argv(self) -> list[str]:
        return remote_argv(self.destination, self.port, "pull", store=self.path)

    def _session(self, keys: Sequence[bytes] = ()) -> _Session:
        """A live session that was not asked for any of `keys` (it would not answer again),
        starting another while fewer than the maximum run, or one beyond (a repeat is rare:
        callers ask each id once)."""
        with self._lock:
            self._sessions = [x for x in self._sessions if x.pull.broken is None]
            fresh = [x for x in self._sessions if not any(x.pull.asked(k) for k in keys)]
            if fresh and len(self._sessions) >= self._max_sessions:
                picked = fresh[next(self._turn) % len(fresh)]
                picked.users += 1
                return picked
        session = _Session(self._argv(), f"ssh {self.destination}", self.options.timeout)
        with self._lock:
            self._sessions.append(session)
            if len(self._sessions) > self._max_sessions:  # the one beyond: the least useful goes
                spare = next((x for x in self._sessions
                              if x is not session and not x.users and not x.pull.busy()), None)
                if spare is not None:
                    self._sessions.remove(spare)
                    spare.end()
        return session

    def _done(self, session: _Session) -> None:
        """The caller of _session is finished with it (from then on it may be ended as a spare)."""
        with self._lock:
            session.users -= 1

    def _drop(self, session: _Session) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
        session.end(kill=True)

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        while True:
            session = self._session([bytes(chunk_id)])
            try:
                answer = session.pull.fetch(chunk_id)
                break
            except AlreadyAsked:
                continue  # another thread asked that session meanwhile: the next pick avoids it
            except (ProtocolError, OSError) as e:
                self._drop(session)
                raise StoreError(f"{self.location}: {e}{session.stderr_text()}") from None
            finally:
                self._done(session)
        if answer is None:
            raise ChunkMissing(chunk_id, [self.location])
        return self._chunk(chunk_id, answer, digest)

    def _chunk(self, chunk_id: ChunkId, answer: tuple[bytes, bool], digest: str | None) -> bytes:
        """A CHUNK answer's data, decoded and verified (always: the protocol carries no guarantee)."""
        try:
            chunk = decode_payload(*answer)
        except CodecError as e:
            raise ChunkInvalid(chunk_id, f"invalid chunk {chunk_id}: {e}", self.location) from None
        verify_chunk(chunk_id, chunk, digest, self.location)
        return chunk

    def fetch_many(self, ids: Sequence[ChunkId],
                   digest: str | None = None) -> Iterator[tuple[ChunkId, bytes | None]]:
        """Every chunk of `ids` (in arrival order), verified; None for the ones the remote lacks.

        One session streams them all (casync's prefetch); decompressing and
        verifying runs on one thread per core. A MISSING answer is final: the
        remote answers each id once per session.
        """
        keys = [bytes(i) for i in dict.fromkeys(ids)]
        while True:
            session = self._session(keys)
            try:
                answers = session.pull.stream(keys)
                break
            except AlreadyAsked:
                self._done(session)
                continue  # asked meanwhile by another thread: the next pick avoids that session
            except (ProtocolError, OSError) as e:
                self._done(session)
                self._drop(session)
                raise StoreError(f"{self.location}: {e}{session.stderr_text()}") from None

        def decode(item: tuple[bytes, tuple[bytes, bool] | None]) -> tuple[ChunkId, bytes | None]:
            key, answer = item
            chunk_id = ChunkId(key)
            return chunk_id, None if answer is None else self._chunk(chunk_id, answer, digest)

        try:
            yield from ordered_map(decode, answers, workers_for(self.options.concurrency, False))
        except (ProtocolError, OSError) as e:
            self._drop(session)
            raise StoreError(f"{self.location}: {e}{session.stderr_text()}") from None
        finally:
            self._done(session)

    def has(self, chunk_id: ChunkId) -> bool:
        if bytes(chunk_id) in self._spooled:
            return True
        try:
            self.get(chunk_id)
        except ChunkMissing:
            return False
        return True

    # ---- writes: spooled here, pushed by flush ------------------------------------------------
    buffers_writes = True  # put() costs no round trip; the remote says at flush what it lacks

    @property
    def writable(self) -> bool:
        return True  # (the remote decides: a refusal is an error at flush)

    def put(self, chunk_id: ChunkId, data: bytes | memoryview) -> None:
        with self._lock:
            if self._spool is None:
                folder = tempfile.mkdtemp(prefix="pydesync-push-")
                self._spool = LocalStore(folder)
            spool = self._spool
        spool.put(chunk_id, data)
        with self._lock:
            self._spooled.add(bytes(chunk_id))

    def flush(self, index: Index | None = None, index_location: str | None = None) -> bool:
        """Push what was put: with the index when it goes to this host (True: the index is written
        there now), else alone. Raises StoreError if the remote does not take them."""
        together = index is not None and index_location is not None and self._same_host(index_location)
        if not self._spooled and not together:
            return False
        if together:
            assert index is not None and index_location is not None
            _, _, index_path = parse_location(index_location)
            self._push(index_path, PUSH_INDEX | PUSH_CHUNKS | PUSH_INDEX_CHUNKS,
                       lambda client: client.push_index(index.to_bytes(), self._spooled_chunk))
        else:
            self._push(None, PUSH_CHUNKS, lambda client: client.push_chunks(self._spooled_chunks()))
        self._spooled.clear()
        return together

    def _same_host(self, location: str) -> bool:
        if location_scheme(location) != "ssh":
            return False
        destination, port, _ = parse_location(location)
        return (destination, port) == (self.destination, self.port)

    def _push(self, index_path: str | None, wants: int, conversation: Callable[[PushClient], object]) -> None:
        argv = remote_argv(self.destination, self.port, "push", index=index_path, store=self.path)
        _converse(argv, self.destination, self.options.timeout,
                  lambda session: conversation(PushClient(session.channel, wants)))

    def _spooled_chunk(self, key: bytes) -> tuple[bytes, bool] | None:
        """A chunk the remote asked for, as stored in the spool (compressed), or None."""
        if key not in self._spooled or self._spool is None:
            return None
        stored, converters = self._spool.get_stored(ChunkId(key))
        return stored, converters.compressed

    def _spooled_chunks(self) -> Iterator[tuple[bytes, bytes, bool]]:
        for key in sorted(self._spooled):
            answer = self._spooled_chunk(key)
            if answer is not None:
                yield key, *answer

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:  # the job failed: what it put is not delivered
            self._spooled.clear()
        self.close()

    def close(self) -> None:
        """Deliver what is still spooled (a writer that did not flush), then end every session."""
        try:
            if self._spooled:
                self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            spool, self._spool = self._spool, None
            self._spooled.clear()
        for session in sessions:
            session.end()
        if spool is not None:
            shutil.rmtree(spool.path, ignore_errors=True)


def _converse(argv: list[str], destination: str, timeout: float | None,
              conversation: Callable[[_Remote], T]) -> tuple[_Remote, T]:
    """Run one remote verb through `conversation(session)`, then end it; a protocol or pipe error
    is a StoreError with the remote's own words. Returns the ended session and the result."""
    session = _Remote(argv, f"ssh {destination}", timeout)
    try:
        result = conversation(session)
    except (ProtocolError, OSError) as e:
        raise session.failed(e) from None
    session.end()
    return session, result


# ---- index locations ------------------------------------------------------------------------------
def read_index_bytes(location: str, options: StoreOptions | None = None) -> bytes:
    """The index at an ssh:// location, as the remote's pull sends it (`pull - - INDEX -`)."""
    destination, port, path = parse_location(location)
    timeout = (options or StoreOptions()).timeout
    _, data = _converse(remote_argv(destination, port, "pull", index=path), destination, timeout,
                        lambda session: read_index_stream(session.channel))
    return data


def write_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    """Write an index to an ssh:// location (`push - - INDEX -`), renamed into place there."""
    destination, port, path = parse_location(location)
    timeout = (options or StoreOptions()).timeout
    argv = remote_argv(destination, port, "push", index=path)

    def push(remote: _Remote) -> bool:
        return PushClient(remote.channel, PUSH_INDEX).push_index_alone(data)

    session, confirmed = _converse(argv, destination, timeout, push)
    if not confirmed and session.proc.returncode != 0:
        raise StoreError(f"{session.peer}: the remote failed to write {location} (exit status "
                         f"{session.proc.returncode}){session.stderr_text()}")


KIND = StoreKind("ssh", lambda location, options, _create: SshStore(location, options),
                 read_index_bytes, write_index_bytes)
