"""Write untar's small new files on a background thread, a batch per native call.

Decoding an archive is Python and holds the GIL; creating a file is a handful of
system calls. Handing whole batches to one writer thread, which releases the GIL
once per batch in `write_new_files`, lets the two overlap on two cores (casync does
both on one). Work that must come after those writes, such as finishing a directory
(its times and mode, which creating files would disturb, and closing its descriptor),
is queued behind the batch that was open when it was asked for, so the order the
archive implies is kept.

Errors surface at the next batch boundary or at `flush`, naming the file.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from .. import _filewriter

T = TypeVar("T")  # deferred work items
L = TypeVar("L")  # labels naming files in errors

BATCH_FILES = 256
BATCH_BYTES = 1 << 20
MAX_DEFERRED = 512  # finished directories hold a descriptor open until their batch lands


def max_deferred(open_directories: int = 64) -> int:
    """How many finished directories may wait for their batch, each holding a descriptor. Twice
    that may be held (a queue, and the batch in flight), beside `open_directories` and a few of
    the process's own: all within the descriptors the process may open (a deep tree finishes
    thousands of directories in a row)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_DEFERRED
    return max(4, min(MAX_DEFERRED, (soft - open_directories - 24) // 2))


class WriteFailed(Exception):
    """A file of a batch could not be created: `label` (given to `add`) names it, `error` says why."""

    def __init__(self, label: object, error: OSError) -> None:
        super().__init__(label, error)
        self.label = label
        self.error = error


class BatchWriter(Generic[T, L]):
    """Queue of new files (written in batches, in order) and of follow-up work (`defer`).

    `finish(item)` runs, on the caller's thread, every deferred item once all files queued
    before it are written; `flush` writes everything left; `abandon` stops and returns the
    deferred items that never ran, so the caller can release what they hold.
    """

    def __init__(self, finish: Callable[[T], None], umask: int, max_deferred: int = MAX_DEFERRED) -> None:
        self._finish = finish
        self._max_deferred = max_deferred
        self._umask = umask
        self._executor: ThreadPoolExecutor | None = None
        self._files: list[tuple[int, bytes, bytes, bytes | memoryview, int, int]] = []
        self._labels: list[L] = []
        self._bytes = 0
        self._deferred: list[T] = []
        # the batch being written: (future, its labels, what waits for it)
        self._inflight: tuple[Future, list[L], list[T]] | None = None
        self._unfinished: list[T] = []  # deferred items a failure left behind

    def add(self, dir_fd: int, temp: bytes, name: bytes, data: bytes | memoryview, mode: int, mtime_ns: int,
            label: L) -> None:
        """Queue one file: created as `temp` in dir_fd, then renamed to `name`; label names it in errors."""
        self._files.append((dir_fd, temp, name, data, mode, mtime_ns))
        self._labels.append(label)
        self._bytes += len(data)
        if len(self._files) >= BATCH_FILES or self._bytes >= BATCH_BYTES:
            self._submit()

    def defer(self, item: T) -> None:
        """Run finish(item) once every file queued so far is written."""
        if not self._files and self._inflight is None:
            self._finish(item)
            return
        self._deferred.append(item)
        if len(self._deferred) >= self._max_deferred:
            self._submit()

    def flush(self) -> None:
        """Write everything queued (on this thread) and run all deferred work."""
        self._wait()
        files, labels, deferred = self._take()
        try:
            if files:
                _check(_filewriter.write_new_files(files, self._umask), labels)
        except BaseException:
            self._unfinished += deferred
            raise
        self._run(deferred)
        self._stop()

    def abandon(self) -> list[T]:
        """After a failure: wait for the writer, drop queued files; returns deferred items not run."""
        left = self._unfinished
        if self._inflight is not None:
            future, _, waiting = self._inflight
            self._inflight = None
            future.exception()  # wait; the first error was already reported, or another one is
            left += waiting
        left += self._deferred
        self._files, self._labels, self._deferred, self._unfinished = [], [], [], []
        self._stop()
        return left

    # ---- internals ----------------------------------------------------------------------------
    def _take(self) -> tuple[list, list[L], list[T]]:
        taken = self._files, self._labels, self._deferred
        self._files, self._labels, self._deferred, self._bytes = [], [], [], 0
        return taken

    def _submit(self) -> None:
        self._wait()
        files, labels, deferred = self._take()
        if not files:
            self._run(deferred)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pydesync-untar")
        future = self._executor.submit(_filewriter.write_new_files, files, self._umask)
        self._inflight = (future, labels, deferred)

    def _wait(self) -> None:
        if self._inflight is None:
            return
        future, labels, deferred = self._inflight
        self._inflight = None
        try:
            _check(future.result(), labels)
        except BaseException:
            self._unfinished += deferred
            raise
        self._run(deferred)

    def _run(self, deferred: list[T]) -> None:
        for i, item in enumerate(deferred):
            try:
                self._finish(item)
            except BaseException:
                self._unfinished += deferred[i + 1:]
                raise

    def _stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _check(result: tuple[int, int] | None, labels: list[L]) -> None:
    if result is not None:
        index, err = result
        raise WriteFailed(labels[index], OSError(err, os.strerror(err)))
