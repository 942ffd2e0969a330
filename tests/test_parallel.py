"""The thread helpers behind make, extract, verify and prune (pydesync.parallel)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from procutil import HANG_GUARD

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
    """Each thread has `depth` items begun before it finishes its oldest. Both threads are made to
    reach that depth (the first to get there waits for the other), so neither can take all the
    work before the other starts."""
    outstanding: Counter[int] = Counter()
    peak: Counter[int] = Counter()
    done: list[int] = []
    lock = threading.Lock()
    both_full = threading.Barrier(2, timeout=HANG_GUARD)

    def begin(i: int):
        me = threading.get_ident()
        with lock:
            outstanding[me] += 1
            first_time_full = outstanding[me] == 5 and peak[me] < 5
            peak[me] = max(peak[me], outstanding[me])
        if first_time_full:
            both_full.wait()

        def finish() -> None:
            with lock:
                outstanding[me] -= 1
                done.append(i)
        return finish

    for_each_pipelined(begin, list(range(400)), workers=2, depth=5)
    assert sorted(done) == list(range(400))
    assert set(peak.values()) == {5} and len(peak) == 2


def test_for_each_pipelined_stops_at_the_first_failure():
    """Item 50 fails. The other thread, holding later items, finishes each only once the failing
    thread has ended (so the failure is recorded): it then stops at its next step instead of
    working through the rest."""
    finished: list[int] = []
    failing: list[threading.Thread] = []
    failed = threading.Event()

    def begin(i: int):
        def finish() -> None:
            if i == 50:
                failing.append(threading.current_thread())
                failed.set()
                raise ValueError("chunk 50 is bad")
            if i > 50:
                assert failed.wait(HANG_GUARD)
                if failing[0] is not threading.current_thread():
                    failing[0].join(HANG_GUARD)
            finished.append(i)
        return finish

    with pytest.raises(ValueError, match="chunk 50"):
        for_each_pipelined(begin, list(range(2000)), workers=2, depth=4)
    assert max(finished) < 50 + 2 * 4 + 2, sorted(finished)  # at most what was begun when 50 failed


def test_pipeline_shape():
    cores = __import__("os").cpu_count() or 1
    threads, depth = pipeline_shape(10, remote=True, pipelined=True)
    assert threads == min(10, cores) and threads * depth >= 10
    assert pipeline_shape(10, remote=True, pipelined=False) == (10, 1)  # S3, sftp: -n threads
    assert pipeline_shape(10, remote=False, pipelined=False) == (min(10, cores), 1)
