"""Bounded thread pools: hashing, compression and I/O release the GIL, so threads scale.

Everything here keeps at most a fixed number of items in flight, so memory
stays flat however long the input is.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_CONCURRENCY = 10


def workers_for(concurrency: int, remote: bool) -> int:
    """Threads for a job: all of -n when waiting on a network, at most one per core for CPU work."""
    return max(1, concurrency if remote else min(concurrency, os.cpu_count() or 1))


def pipeline_shape(concurrency: int, remote: bool, pipelined: bool) -> tuple[int, int]:
    """(threads, depth) for for_each_pipelined. A store that sends requests ahead (`pipelined`):
    one thread per core at most, each keeping enough requests in flight that -n are outstanding
    in all. Other network stores: -n threads, one request each. Local stores: one per core.

    Why: -n threads on few cores spend their time handing the GIL and the CPUs to each other;
    a thread per core that starts the next requests before decoding the current chunk keeps
    the network as busy with far fewer wake-ups."""
    if not (remote and pipelined):
        return workers_for(concurrency, remote), 1
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    return threads, -(-max(1, concurrency) // threads)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                window: int | None = None) -> Iterator[R]:
    """Like map(), run in `workers` threads, results in input order, at most `window` pending.

    The threads are daemons, as for_each's are: a consumer that stops early (an error, Ctrl-C,
    SIGTERM) is not held at exit by a worker waiting on a stalled peer, which a ThreadPoolExecutor's
    threads (joined at interpreter exit) did."""
    workers = max(1, workers)
    window = window or 2 * workers
    if workers == 1:
        yield from map(fn, items)
        return
    jobs: queue.SimpleQueue[tuple[Future[R], T] | None] = queue.SimpleQueue()

    def work() -> None:
        while (job := jobs.get()) is not None:
            future, item = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(item))
            except BaseException as e:
                future.set_exception(e)

    threads = [threading.Thread(target=work, name="pydesync-map", daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            future: Future[R] = Future()
            jobs.put((future, item))
            pending.append(future)
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for _ in threads:
            jobs.put(None)


def for_each_pipelined(begin: Callable[[T], Callable[[], object]], items: Sequence[T], workers: int,
                       depth: int) -> None:
    """Like for_each, but each thread calls begin(item) up to `depth` items ahead and then the
    callable it returned, oldest first: begin sends a request, the callable finishes the work."""
    if depth <= 1:
        for_each(lambda item: begin(item)(), items, workers)
        return
    counter = itertools.count()
    total = len(items)
    failed: list[bool] = []

    def run(_: int) -> None:
        pending: deque[Callable[[], object]] = deque()
        try:
            while not failed:
                i = next(counter)
                if i < total:
                    pending.append(begin(items[i]))
                    if len(pending) < depth:
                        continue
                if not pending:
                    return
                pending.popleft()()
        except BaseException:
            failed.append(True)  # the other threads stop at their next step
            raise

    for_each(run, range(max(1, min(workers, total))), workers)


def for_each(fn: Callable[[T], object], items: Iterable[T], workers: int) -> None:
    """Run fn on every item using `workers` threads; the first exception stops the rest and is raised.

    A sequence is handed out by a shared counter (atomic under the GIL): no futures or
    queues per item, which matters when items are many and small (chunks) and the work
    itself releases the GIL. Any other iterable (a store listing) is drawn one item at a
    time under a lock, so it is never held in memory whole.
    """
    if isinstance(items, Sequence):
        total = len(items)
        workers = max(1, min(workers, total))
        counter = itertools.count()

        def take() -> tuple[bool, T | None]:
            i = next(counter)
            return (True, items[i]) if i < total else (False, None)
    else:
        iterator = iter(items)
        lock = threading.Lock()
        workers = max(1, workers)

        def take() -> tuple[bool, T | None]:
            with lock:
                for item in iterator:
                    return True, item
                return False, None
    if workers == 1:
        for item in items:
            fn(item)
        return
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            while not failures:
                more, item = take()
                if not more:
                    return
                fn(cast(T, item))  # (more: an item was taken)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, name=f"pydesync-{n}", daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:  # Ctrl-C: stop handing out work, then re-raise
        failures.append(KeyboardInterrupt())
        raise
    if failures:
        raise failures[0]
