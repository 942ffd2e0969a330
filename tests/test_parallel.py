"""The thread helpers behind make, extract, verify and prune (pydesync.parallel)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from pydesync.parallel import for_each, for_each_pipelined, pipeline_shape


def test_for_each_draws_an_iterator_lazily_and_once():
    """A store listing is consumed item by item: never all at once, every item exactly once."""
    seen: Counter[int] = Counter()
    pulled = [0]
    peak = [0]
    lock = threading.Lock()

    def listing():
        for i in range(5000):
            pulled[0] += 1
            yield i

    def work(i: int) -> None:
        with lock:
            seen[i] += 1
            peak[0] = max(peak[0], pulled[0] - sum(seen.values()))

    for_each(work, listing(), 4)
    assert seen == Counter(range(5000))
    assert peak[0] <= 4  # at most one item per worker drawn ahead of the work done


def test_for_each_pipelined_keeps_depth_in_flight_per_thread():
    outstanding: Counter[int] = Counter()
    peak: Counter[int] = Counter()
    done: list[int] = []
    lock = threading.Lock()

    def begin(i: int):
        me = threading.get_ident()
        with lock:
            outstanding[me] += 1
            peak[me] = max(peak[me], outstanding[me])

        def finish() -> None:
            time.sleep(0.0005)
            with lock:
                outstanding[me] -= 1
                done.append(i)
        return finish

    for_each_pipelined(begin, list(range(400)), workers=2, depth=5)
    assert sorted(done) == list(range(400))
    assert set(peak.values()) == {5} and len(peak) == 2


def test_for_each_pipelined_stops_at_the_first_failure():
    finished: list[int] = []

    def begin(i: int):
        def finish() -> None:
            if i == 50:
                raise ValueError("chunk 50 is bad")
            time.sleep(0.001)
            finished.append(i)
        return finish

    with pytest.raises(ValueError, match="chunk 50"):
        for_each_pipelined(begin, list(range(2000)), workers=2, depth=4)
    assert len(finished) < 500


def test_pipeline_shape():
    cores = __import__("os").cpu_count() or 1
    threads, depth = pipeline_shape(10, remote=True, pipelined=True)
    assert threads == min(10, cores) and threads * depth >= 10
    assert pipeline_shape(10, remote=True, pipelined=False) == (10, 1)  # S3, sftp: -n threads
    assert pipeline_shape(10, remote=False, pipelined=False) == (min(10, cores), 1)
