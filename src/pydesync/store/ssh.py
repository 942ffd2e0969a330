"""`ssh://[user@]host[:port]/path` stores: casync's pull protocol over ssh.

Each session runs `$CASYNC_SSH_PATH` (default ssh) with the remote command
`$CASYNC_REMOTE_PATH pull - - - '<path>'` (default casync; `pydesync` or
`desync` work too). Up to `concurrency` sessions run at once, started on
demand; every chunk received is verified. Sessions end on close(), on errors
and at interpreter exit, so no ssh process outlives the command. A remote that
owes answers and sends nothing for the store's `timeout` is an error (casync
and desync wait forever).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import subprocess
import threading
from collections.abc import Iterator, Sequence
from urllib.parse import unquote, urlsplit

from ..codec import CodecError
from ..digest import ChunkId
from ..errors import ChunkInvalid, ChunkMissing, StoreError, UsageError
from ..parallel import ordered_map, workers_for
from ..protocol import AlreadyAsked, Channel, ProtocolError, PullSession, decode_payload
from .base import Store, StoreOptions, close_at_exit, verify_chunk

MAX_SESSIONS = 2



class _Session:
    def __init__(self, argv: list[str], peer: str, timeout: float | None):
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0)
        except OSError as e:
            raise StoreError(f"cannot run {argv[0]}: {e.strerror}") from None
        self.errors: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.channel = Channel(self.proc.stdout, self.proc.stdin, peer, timeout)  # type: ignore[arg-type]
        try:
            self.pull = PullSession(self.channel)
        except (ProtocolError, OSError) as e:
            self.end(kill=True)
            raise StoreError(f"{peer}: {e}{self.stderr_text()}") from None

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(line)
            del self.errors[:-5]

    def stderr_text(self) -> str:
        text = b" ".join(line.strip() for line in self.errors).decode("utf-8", "replace").strip()
        return f" ({text})" if text else ""

    def end(self, kill: bool = False) -> None:
        """Say goodbye (unless killing), close the pipes, and make sure the process is gone."""
        if not kill:
            with contextlib.suppress(OSError, ProtocolError, AttributeError):
                self.pull.goodbye()
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


class SshStore(Store):
    """Read-only chunk store on the far side of an ssh connection."""

    remote = True

    def __init__(self, location: str, options: StoreOptions | None = None):
        self.location = location
        self.options = options or StoreOptions()
        if getattr(self.options, "encryption", False):
            raise UsageError(f"encryption is not supported by ssh stores ({location})")
        parts = urlsplit(location)
        host = parts.hostname or ""
        if not host or host.startswith("-"):
            raise UsageError(f"invalid ssh store location '{location}'")
        self.destination = f"{parts.username}@{host}" if parts.username else host
        try:
            self.port = parts.port
        except ValueError:
            raise UsageError(f"invalid port in ssh store location '{location}'") from None
        self.path = unquote(parts.path) or "/"
        self._sessions: list[_Session] = []
        self._lock = threading.Lock()
        self._turn = itertools.count()
        # Sessions carry many requests at once; a few suffice, each is a process on the remote.
        self._max_sessions = max(1, min(self.options.concurrency, MAX_SESSIONS))
        close_at_exit(self)

    def _argv(self) -> list[str]:
        ssh = os.environ.get("CASYNC_SSH_PATH", "ssh")
        remote = os.environ.get("CASYNC_REMOTE_PATH", "casync")
        command = f"{remote} pull - - - {shlex.quote(self.path)}"
        return [ssh, *(["-p", str(self.port)] if self.port else []), "--", self.destination, command]

    def _session(self, keys: Sequence[bytes] = ()) -> _Session:
        """A live session that was not asked for any of `keys` (it would not answer again),
        starting another while fewer than the maximum run, or one beyond (a repeat is rare:
        callers ask each id once)."""
        with self._lock:
            self._sessions = [x for x in self._sessions if x.pull.broken is None]
            fresh = [x for x in self._sessions if not any(x.pull.asked(k) for k in keys)]
            if fresh and len(self._sessions) >= self._max_sessions:
                return fresh[next(self._turn) % len(fresh)]
        session = _Session(self._argv(), f"ssh {self.destination}", self.options.timeout)
        with self._lock:
            self._sessions.append(session)
            if len(self._sessions) > self._max_sessions:  # the one beyond: the least useful goes
                spare = next((x for x in self._sessions if x is not session and not x.pull.busy()), None)
                if spare is not None:
                    self._sessions.remove(spare)
                    spare.end()
        return session

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

    streams = True

    def fetch_many(self, ids: list[ChunkId],
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
                continue  # asked meanwhile by another thread: the next pick avoids that session
            except (ProtocolError, OSError) as e:
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

    def has(self, chunk_id: ChunkId) -> bool:
        try:
            self.get(chunk_id)
        except ChunkMissing:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.end()
