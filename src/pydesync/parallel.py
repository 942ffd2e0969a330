"""Bounded thread pools: hashing, compression and I/O release the GIL, so threads scale.

Everything here keeps at most a fixed number of items in flight, so memory
stays flat however long the input is.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_CONCURRENCY = 10


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


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


def run_all(fn: Callable[[T], object], items: Iterable[T], workers: int) -> None:
    """Run fn on every item in threads; the first exception stops the rest and is raised."""
    for _ in ordered_map(fn, items, workers, window=4 * max(1, workers)):
        pass
