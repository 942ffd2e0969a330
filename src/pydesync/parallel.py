"""Bounded thread pools: hashing, compression and I/O release the GIL, so threads scale.

Everything here keeps at most a fixed number of items in flight, so memory
stays flat however long the input is.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_CONCURRENCY = 10


def workers_for(concurrency: int, remote: bool) -> int:
    """Threads for a job: all of -n when waiting on a network, at most one per core for CPU work."""
    return max(1, concurrency if remote else min(concurrency, os.cpu_count() or 1))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                window: int | None = None) -> Iterator[R]:
    """Like map(), run in `workers` threads, results in input order, at most `window` pending."""
    workers = max(1, workers)
    window = window or 2 * workers
    if workers == 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pydesync") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def for_each(fn: Callable[[T], object], items: Sequence[T], workers: int) -> None:
    """Run fn on every item using `workers` threads; the first exception stops the rest and is raised.

    Threads take the next index from a shared counter (atomic under the GIL):
    no futures or queues per item, which matters when items are many and small
    (chunks) and the work itself releases the GIL.
    """
    workers = max(1, min(workers, len(items)))
    if workers == 1:
        for item in items:
            fn(item)
        return
    counter = itertools.count()
    failures: list[BaseException] = []
    total = len(items)

    def worker() -> None:
        try:
            while not failures:
                i = next(counter)
                if i >= total:
                    return
                fn(items[i])
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
