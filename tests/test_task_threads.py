"""The worker's thread pool (real threads, no sockets)."""
import threading

import pytest

from distributed.worker import TaskThreads


def blocker(started, release, value):
    started.set()
    release.wait(30)
    return value


@pytest.mark.timeout(30)
def test_abandoned_run_frees_its_slot_and_finishes_in_the_background():
    pool = TaskThreads(1)
    try:
        started, release = threading.Event(), threading.Event()
        long = pool.submit("long", blocker, started, release, "L")
        assert started.wait(10)
        quick = pool.submit("quick", lambda: "Q")
        with pytest.raises(TimeoutError):
            quick.result(timeout=0.3)      # one thread: it waits for the slot
        pool.abandon("long")
        assert quick.result(timeout=10) == "Q"
        assert not long.done()
        release.set()
        assert long.result(timeout=10) == "L"
    finally:
        pool.shutdown()


@pytest.mark.timeout(30)
def test_run_abandoned_before_it_starts_is_skipped_unless_resumed():
    pool = TaskThreads(1)
    try:
        started, release = threading.Event(), threading.Event()
        first = pool.submit("first", blocker, started, release, 1)
        assert started.wait(10)
        ran = []
        skipped = pool.submit("skipped", ran.append, "skipped")
        resumed = pool.submit("resumed", ran.append, "resumed")
        pool.abandon("skipped")
        pool.abandon("resumed")
        pool.resume("resumed")
        release.set()
        assert first.result(timeout=10) == 1
        assert skipped.result(timeout=10) is None
        resumed.result(timeout=10)
        assert ran == ["resumed"]
        # the slots all came back: two more runs in a row still go through
        assert pool.submit("a", lambda: 1).result(timeout=10) == 1
        assert pool.submit("b", lambda: 2).result(timeout=10) == 2
    finally:
        pool.shutdown()


@pytest.mark.timeout(30)
def test_at_most_nthreads_run_at_once():
    pool = TaskThreads(2)
    lock = threading.Lock()
    now, peak = [0], [0]
    gate = threading.Event()

    def work():
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        gate.wait(0.05)
        with lock:
            now[0] -= 1

    try:
        futs = [pool.submit("k%d" % i, work) for i in range(12)]
        for f in futs:
            f.result(timeout=10)
        assert peak[0] == 2
    finally:
        pool.shutdown()
