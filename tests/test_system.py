"""System tests: real ``dask-scheduler`` and ``dask-worker`` processes
(``cluster()``), driven through the blocking Executor API.

Worker processes cannot import this test module (``tests/`` is not on their
path), so its functions are pickled by value.
"""
import asyncio
import os
import signal
import sys
import threading
import time

import cloudpickle
import psutil
import pytest

from distributed import CancelledError, Executor
from distributed.utils_test import cluster, gone, inc, pid_of_address, poll, slowinc, throws

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def fails_with_value_error(x):
    raise ValueError("bad input %d" % x)


def append_line(path, x):
    with open(path, "a") as f:
        f.write("ran\n")
    return x


def make_array(nbytes):
    import numpy as np

    return np.ones(nbytes // 8)


def make_lock():
    return threading.Lock()


def worker_pids(nanny_procs):
    """Pids of the worker processes started by the ``dask-worker`` nannies."""
    pids = []
    for p in nanny_procs:
        pids.extend(c.pid for c in psutil.Process(p.pid).children())
    return pids


@pytest.fixture(scope="module")
def shared():
    """One process cluster for the tests that leave it as they found it."""
    with cluster(nworkers=2, nthreads=1) as (addr, sched, workers):
        yield addr, sched, workers


# ---------------------------------------------------------------- basic API
def test_gather_map_and_submit_chain(shared):
    addr, _, _ = shared
    with Executor(addr, set_as_default=False) as e:
        assert e.gather(e.map(inc, range(50))) == list(range(1, 51))
        x = e.submit(inc, 1)
        y = e.submit(inc, x)
        assert y.result(timeout=10) == 3
        assert len(e.ncores()) == 2


def test_random_functions_draw_different_numbers_on_each_worker(shared):
    import random

    import numpy as np

    addr, _, _ = shared
    with Executor(addr, set_as_default=False) as e:
        draws = e.gather([e.submit(random.random, pure=False) for _ in range(20)])
        assert len(set(draws)) == 20
        arrays = e.gather([e.submit(np.random.random, 3, pure=False) for _ in range(6)])
        assert len({tuple(a) for a in arrays}) == 6


def test_result_timeout_raises_builtin_timeout_error(shared):
    addr, _, _ = shared
    with Executor(addr, set_as_default=False) as e:
        f = e.submit(slowinc, 1, delay=2.0)
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            f.result(timeout=0.2)
        assert time.monotonic() - start < 1.5
        assert issubclass(info.type, TimeoutError)
        assert f.status == "pending"
        # the work goes on; a longer wait gets the value
        assert f.result(timeout=20) == 2


def test_same_call_from_two_executors_shares_a_key_and_runs_once(shared, tmp_path):
    addr, _, _ = shared
    path = str(tmp_path / "runs.txt")
    with Executor(addr, set_as_default=False) as e1, Executor(addr, set_as_default=False) as e2:
        x = e1.submit(append_line, path, 42)
        y = e2.submit(append_line, path, 42)
        assert x.key == y.key
        assert x.key.startswith("append_line-")
        assert x.result(timeout=10) == 42
        assert y.result(timeout=10) == 42
        z = e2.submit(append_line, path, 43)
        assert z.key != x.key
        assert z.result(timeout=10) == 43
        with open(path) as f:
            assert f.read().count("ran") == 2
        # the key is still held by e2 after e1 lets go
        key = x.key
        del x
        assert e2.gather(y) == 42
        assert e2.who_has([y])[key]


def test_exception_type_and_traceback_from_worker_process(shared):
    addr, _, _ = shared
    with Executor(addr, set_as_default=False) as e:
        f = e.submit(fails_with_value_error, 7)
        with pytest.raises(ValueError, match="bad input 7"):
            f.result(timeout=10)
        tb = f.traceback(timeout=10)
        assert "fails_with_value_error" in tb      # pickled by value: no source file
        assert tb.rstrip().endswith("ValueError: bad input 7")
        assert type(f.exception(timeout=10)) is ValueError
        g = e.submit(inc, f)
        with pytest.raises(ValueError, match="bad input 7"):
            e.gather([g])
        assert e.submit(inc, 1).result(timeout=10) == 2
        # a function the worker imports: its source line is in the traceback
        h = e.submit(throws, 1)
        with pytest.raises(RuntimeError, match="hello!"):
            h.result(timeout=10)
        assert 'raise RuntimeError("hello!")' in h.traceback(timeout=10)
        assert "in throws" in h.traceback(timeout=10)


def test_release_frees_data_and_worker_memory(shared):
    addr, _, nannies = shared
    pids = pid_of_address(worker_pids(nannies))
    assert len(pids) == 2
    with Executor(addr, set_as_default=False) as e:
        x = e.submit(make_array, 200_000_000)
        poll(lambda: x.done(), timeout=30, msg="array computed")  # not fetched
        assert x.status == "finished"
        holders = [w for w, keys in e.has_what().items() if x.key in keys]
        assert len(holders) == 1
        proc = psutil.Process(pids[holders[0]])
        peak = proc.memory_info().rss
        assert peak > 200_000_000
        key = x.key
        del x
        poll(lambda: not any(e.has_what().values()), timeout=10, msg="has_what empty")
        assert key not in e.who_has()
        poll(lambda: proc.memory_info().rss < peak - 150_000_000, timeout=10,
             msg="worker RSS dropped by 150 MB")


def test_unpicklable_function_fails_at_submit_with_type_error(shared):
    addr, _, _ = shared
    lock = threading.Lock()
    with Executor(addr, set_as_default=False) as e:
        with pytest.raises(TypeError, match="(?i)pickl|serializ"):
            e.submit(lambda x: (lock, x), 1)
        assert not e.futures
        assert e.submit(inc, 1).result(timeout=10) == 2


def test_unpicklable_result_errs_on_result_and_cluster_keeps_working(shared):
    addr, _, _ = shared
    with Executor(addr, set_as_default=False) as e:
        f = e.submit(make_lock)
        poll(lambda: f.done(), timeout=10)
        with pytest.raises(TypeError, match="(?i)pickl|serializ"):
            f.result(timeout=10)
        # a task using it on the worker holding it works (no transfer)
        assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
        assert e.submit(inc, 41).result(timeout=10) == 42


def test_async_executor_with_asyncio_run(shared):
    addr, _, _ = shared

    async def main():
        async with Executor(addr, asynchronous=True) as e:
            x = e.submit(inc, 1)
            y = e.submit(inc, x)
            futures = e.map(inc, range(5))
            return await y, await e._gather(futures), await e._gather({"x": x})

    assert asyncio.run(main()) == (3, [1, 2, 3, 4, 5], {"x": 2})


def test_result_of_cancelled_future_raises_cancelled_error(shared):
    addr, _, _ = shared
    with Executor(addr, set_as_default=False) as e:
        x = e.submit(slowinc, 1, delay=1)
        e.cancel([x])
        assert x.cancelled()
        with pytest.raises(CancelledError):
            x.result(timeout=5)
        with pytest.raises(CancelledError):
            e.gather([x])
        assert e.submit(inc, 1).result(timeout=10) == 2


# ---------------------------------------------------------------- failures and life cycle
def test_bad_scheduler_address_raises_os_error_quickly():
    start = time.monotonic()
    with pytest.raises(OSError):
        Executor("tcp://127.0.0.1:1", timeout=2, set_as_default=False)
    assert time.monotonic() - start < 6


def test_restart_cancels_futures_and_replaces_worker_processes():
    with cluster(nworkers=2) as (addr, _, nannies):
        old = worker_pids(nannies)
        assert len(old) == 2
        with Executor(addr, set_as_default=False) as e:
            x = e.submit(inc, 1)
            y = e.submit(slowinc, 1, delay=10)
            assert x.result(timeout=10) == 2
            e.restart(timeout=60)
            assert x.cancelled() and y.cancelled()
            assert not e.futures
            assert e.submit(inc, 10).result(timeout=20) == 11
            assert len(e.ncores()) == 2
        new = worker_pids(nannies)
        assert len(new) == 2
        assert not set(new) & set(old)
        poll(lambda: all(gone(p) for p in old), timeout=10, msg="old workers gone")


def test_worker_killed_mid_task_gather_still_returns_values():
    with cluster(nworkers=2) as (addr, _, nannies):
        with Executor(addr, set_as_default=False) as e:
            futures = e.map(slowinc, range(20), delay=0.2)
            pids = pid_of_address(worker_pids(nannies))
            poll(lambda: any(e.processing().values()), timeout=10)
            victim = next(w for w, keys in e.processing().items() if keys)
            os.kill(pids[victim], signal.SIGKILL)
            assert e.gather(futures, timeout=60) == list(range(1, 21))
            # the nanny started a replacement
            poll(lambda: len(e.ncores()) == 2, timeout=30)
            assert victim not in e.ncores()


def test_local_cluster_without_address_and_workers_gone_after_close():
    with Executor() as e:
        assert e.cluster is not None
        assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
        pids = [n.process.pid for n in e.cluster.nannies]
        assert len(pids) == len(e.ncores()) >= 1
        assert all(psutil.pid_exists(p) for p in pids)
    assert e.status == "closed"
    poll(lambda: all(gone(p) for p in pids), timeout=10, msg="local workers gone")


def test_scattered_data_survives_the_death_of_the_worker_holding_it():
    import numpy as np

    with cluster(nworkers=2) as (addr, _, nannies):
        with Executor(addr, set_as_default=False) as e:
            arr = np.arange(1_000_000, dtype="f8")
            x = e.scatter(arr)
            assert x.result(timeout=20).sum() == arr.sum()
            (holder,) = e.who_has([x])[x.key]
            pids = pid_of_address(worker_pids(nannies))
            assert sorted(e.run(os.getpid)) == sorted(pids)
            assert e.run(os.getpid)[holder] == pids[holder]
            os.kill(pids[holder], signal.SIGKILL)
            poll(lambda: holder not in e.ncores(), timeout=30, msg="holder removed")
            # the scheduler kept the bytes: the data is made again elsewhere
            y = e.submit(np.sum, x)
            assert y.result(timeout=30) == arr.sum()
            assert holder not in e.who_has([x])[x.key]
