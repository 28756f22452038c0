"""Regression tests for the bug-report cases in /work/shared/cases.

Each test reproduces one case with its own code against a real local cluster
(``Executor()``: scheduler in this process, one nanny-supervised worker
process per core) and asserts the right behaviour named in the case's
header, including a few variants of the same kind of fault.  Cases that
restart, kill or close the cluster (12, 13, 21, 22) start their own
executor; the others share one per module.
"""
import functools
import gc
import os
import threading
import time
import weakref

import dask
import pytest

from distributed import CancelledError, Executor, Future, as_completed, wait
from distributed.utils_test import poll

# ---------------------------------------------------------------- task functions
# Tasks are pickled by reference, so the worker processes import this module.


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def echo(x):
    return x


def slow(i, seconds):
    time.sleep(seconds)
    return i


def slow_value(v, seconds):
    time.sleep(seconds)
    return v


def make_adder(n):
    return lambda x: x + n


def factory_a():
    def helper(x):
        return x * 2
    return helper


def factory_b():
    def helper(x):
        return x * 3
    return helper


def record(path, value):
    """Append ``value`` to the log at ``path``: counts executions."""
    with open(path, "a") as f:
        f.write("%s\n" % value)
    return value


def count_records(path, value):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip() == str(value))


def draw():
    import random
    return random.random()


def ten_over(x):
    return 10 / x


def lookup(d, k):
    return d[k]


def make_data(n):
    return list(range(n))


def add_total(i, data=None, offset=0):
    return sum(data) + i + offset


def length_plus(i, items=None):
    return len(items) + i


def die_once_then_add(x, marker, client_pid):
    if os.getpid() == client_pid:
        return "IN-PROCESS"
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies mid-task
    return x + 10


def flaky(marker):
    """Fails the first time (leaving ``marker``), succeeds afterwards."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    return "ok"


class BadUnpickle:
    """Pickles fine, raises when unpickled."""

    def __reduce__(self):
        return (_rebuild, ())


def _rebuild():
    raise AssertionError("this object cannot be rebuilt")


def make_lock():
    return threading.Lock()


def make_list_with_lock():
    return [1, threading.Lock()]


def make_bad():
    return BadUnpickle()


def type_name(x):
    return type(x).__name__


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def e():
    """One local cluster shared by the cases that leave it intact."""
    ex = Executor()
    yield ex
    ex.close()


def _worker_count(ex):
    return len(ex.ncores())


# ---------------------------------------------------------------- case 01
def test_map_over_iterator_then_as_completed(e):
    # map consumes iterators into lists (documented), so over an iterator it
    # must behave exactly as over a list: never silently yield nothing.
    for make in [lambda: list(range(10)), lambda: iter(range(10)),
                 lambda: (i for i in range(10)), lambda: map(int, range(10))]:
        fs = e.map(echo, make())
        assert len(fs) == 10
        done = list(as_completed(fs, timeout=30))
        assert len(done) == 10
        assert sorted(f.result(timeout=30) for f in done) == list(range(10))

    # several iterables, all iterators: zipped like the builtin map
    fs = e.map(add, iter(range(5)), (10 * i for i in range(5)))
    assert sorted(f.result(timeout=30) for f in as_completed(fs, timeout=30)) == \
        [0, 11, 22, 33, 44]
    assert e.gather(fs) == [0, 11, 22, 33, 44]


# ---------------------------------------------------------------- case 03
def test_different_functions_same_args_get_distinct_keys(e):
    gt = e.submit(lambda a, b: a > b, 1, 1)
    ge = e.submit(lambda a, b: a >= b, 1, 1)
    assert gt.key != ge.key
    assert (gt.result(timeout=30), ge.result(timeout=30)) == (False, True)

    add1, add2 = make_adder(1), make_adder(2)
    f1, f2 = e.submit(add1, 10), e.submit(add2, 10)
    assert f1.key != f2.key
    assert (f1.result(timeout=30), f2.result(timeout=30)) == (11, 12)

    h1, h2 = factory_a(), factory_b()
    assert h1.__name__ == h2.__name__
    g1, g2 = e.submit(h1, 10), e.submit(h2, 10)
    assert g1.key != g2.key
    assert (g1.result(timeout=30), g2.result(timeout=30)) == (20, 30)

    p1, p2 = e.submit(functools.partial(add, 1), 10), e.submit(functools.partial(add, 2), 10)
    assert p1.key != p2.key
    assert (p1.result(timeout=30), p2.result(timeout=30)) == (11, 12)

    # the same holds for map
    m1 = e.map(lambda x: x - 1, [5, 6])
    m2 = e.map(lambda x: x * 10, [5, 6])
    assert {f.key for f in m1}.isdisjoint(f.key for f in m2)
    assert (e.gather(m1), e.gather(m2)) == ([4, 5], [50, 60])

    # same function object, same arguments: same key
    double = lambda x: x * 2  # noqa: E731
    k1, k2 = e.submit(double, 3), e.submit(double, 3)
    assert k1.key == k2.key
    assert k1.result(timeout=30) == 6


# ---------------------------------------------------------------- case 04
def test_pure_submits_dedup_and_impure_submits_rerun(e, tmp_path):
    log = str(tmp_path / "calls.log")

    a = e.submit(record, log, 5)
    b = e.submit(record, log, 5)
    assert a.key == b.key
    assert (a.result(timeout=30), b.result(timeout=30)) == (5, 5)
    ms = e.map(record, [log] * 3, [6] * 3)
    assert len({f.key for f in ms}) == 1
    assert e.gather(ms) == [6, 6, 6]

    imp = [e.submit(record, log, 7, pure=False) for _ in range(3)]
    assert len({f.key for f in imp}) == 3
    assert [f.result(timeout=30) for f in imp] == [7, 7, 7]
    mimp = e.map(record, [log] * 2, [8] * 2, pure=False)
    assert len({f.key for f in mimp}) == 2
    assert e.gather(mimp) == [8, 8]

    time.sleep(0.5)  # a duplicate run would show up in the log by now
    assert [count_records(log, v) for v in (5, 6, 7, 8)] == [1, 1, 3, 2]

    r1 = e.submit(draw, pure=False)
    r2 = e.submit(draw, pure=False)
    assert r1.key != r2.key
    assert r1.result(timeout=30) != r2.result(timeout=30)


# ---------------------------------------------------------------- case 06
def test_get_with_reused_key_names_computes_new_graph(e):
    got = [e.get({"v": 0}, "v"), e.get({"v": 1}, "v"),
           e.get({"w": (inc, 0)}, "w"), e.get({"w": (inc, 1)}, "w")]
    assert got == [0, 1, 1, 2]

    # back to back, many times, with dependencies and nested key lists
    for i in range(20):
        assert e.get({"v": i}, "v") == i
        assert e.get({"w": (inc, i)}, "w") == i + 1
        assert e.get({"a": i, "b": (inc, "a")}, ["a", "b"]) == [i, i + 1]
        assert e.get({"a": (add, i, 1), "b": (inc, "a")}, [["b"], "a"]) == [[i + 2], i + 1]


# ---------------------------------------------------------------- case 07
def test_gather_partial_failure_raises_original_and_keeps_others(e):
    fs = e.map(ten_over, [1, 2, 0, 5])
    with pytest.raises(ZeroDivisionError):
        e.gather(fs)
    with pytest.raises(ZeroDivisionError):
        fs[2].result(timeout=30)
    assert isinstance(fs[2].exception(timeout=30), ZeroDivisionError)
    assert fs[2].status == "error"

    assert e.gather([fs[0], fs[1], fs[3]]) == [10.0, 5.0, 2.0]
    assert [f.exception(timeout=30) for f in (fs[0], fs[1], fs[3])] == [None] * 3
    assert len(list(as_completed(fs, timeout=30))) == 4

    # another exception type comes back as itself too
    k = e.submit(lookup, {}, "missing")
    with pytest.raises(KeyError):
        e.gather([fs[0], k])
    with pytest.raises(KeyError):
        k.result(timeout=30)
    assert fs[0].result(timeout=30) == 10.0


# ---------------------------------------------------------------- case 10
def test_map_kwargs_are_broadcast_and_futures_resolved(e):
    data = e.submit(make_data, 5)  # remote [0, 1, 2, 3, 4]
    fs = e.map(add_total, range(4), data=data)
    assert len(fs) == 4
    assert e.gather(fs) == [10, 11, 12, 13]

    # a plain list kwarg reaches every call whole; scalars are broadcast too
    assert e.gather(e.map(length_plus, [0, 100], items=["a", "b", "c"])) == [3, 103]
    assert e.gather(e.map(add_total, [0, 1, 2], data=data, offset=100)) == [110, 111, 112]
    assert e.gather(e.map(add_total, [0, 1], data=[1, 2, 3])) == [6, 7]
    # and submit treats kwargs the same way
    assert e.submit(add_total, 1, data=data).result(timeout=30) == 11


# ---------------------------------------------------------------- case 12
def _assert_cancelled(f):
    t0 = time.time()
    with pytest.raises(CancelledError):
        f.result(timeout=10)
    assert time.time() - t0 < 5


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_restart_cancels_old_futures_and_recovers():
    with Executor() as ex:
        x = ex.submit(inc, 1)
        assert x.result(timeout=30) == 2
        busy = [ex.submit(slow, i, 60, pure=False) for i in range(3)]
        poll(lambda: ex.processing() and any(ex.processing().values()), timeout=30,
             msg="slow tasks running")

        t0 = time.time()
        ex.restart()
        assert time.time() - t0 < 60

        old = [x] + busy
        for f in old:
            _assert_cancelled(f)
            assert f.cancelled()
        with pytest.raises(CancelledError):
            ex.gather(old)
        t0 = time.time()
        assert len(list(as_completed(old, timeout=10))) == 4
        assert time.time() - t0 < 10

        y = ex.submit(inc, 1)  # same key as the cancelled x
        assert y.key == x.key
        assert y.result(timeout=30) == 2
        assert ex.gather(ex.map(inc, range(5))) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- case 13
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_worker_death_mid_task_recomputes_lost_data(tmp_path):
    marker = str(tmp_path / "died")
    with Executor() as ex:
        n = _worker_count(ex)
        x = ex.submit(inc, 1)
        assert x.result(timeout=30) == 2
        y = ex.submit(die_once_then_add, x, marker, os.getpid())
        z = ex.submit(inc, y)
        assert y.result(timeout=120) == 12
        assert os.path.exists(marker)  # a worker really died
        assert z.result(timeout=60) == 13
        assert x.result(timeout=60) == 2
        assert ex.submit(inc, 100).result(timeout=60) == 101
        # the nanny brings the dead worker back
        poll(lambda: _worker_count(ex) == n, timeout=60, msg="%d workers back" % n)
        assert ex.gather(ex.map(inc, range(2 * n), pure=False)) == list(range(1, 2 * n + 1))


# ---------------------------------------------------------------- case 14
def test_failed_key_resubmit_after_release(e, tmp_path):
    marker = str(tmp_path / "tried")
    f = e.submit(flaky, marker)
    key = f.key
    try:
        f.result(timeout=30)
    except RuntimeError:
        pass
    else:
        pytest.fail("first attempt did not fail")
    del f
    gc.collect()
    poll(lambda: key not in e.futures, timeout=10, msg="failed key released")

    g = e.submit(flaky, marker)  # same function and args: same key
    assert g.key == key
    assert g.result(timeout=30) == "ok"


def test_failed_key_resubmit_right_after_del(e, tmp_path):
    """Dropping the last Future releases the key at once (CPython frees it
    on ``del``): an identical submit right after must run again, for a
    single key, a map, and a failed chain."""
    def fail_then_drop(make):
        futs = make()
        for fut in futs:
            try:
                fut.result(timeout=30)
            except RuntimeError:
                pass
        refs = [weakref.ref(fut) for fut in futs]
        del fut, futs
        return refs

    m1 = str(tmp_path / "one")
    refs = fail_then_drop(lambda: [e.submit(flaky, m1)])
    assert [r() for r in refs] == [None], "dropped failed Future kept alive"
    assert e.submit(flaky, m1).result(timeout=30) == "ok"

    m2 = str(tmp_path / "map")
    fail_then_drop(lambda: e.map(flaky, [m2]))
    assert e.map(flaky, [m2])[0].result(timeout=30) == "ok"

    m3 = str(tmp_path / "chain")
    fail_then_drop(lambda: [e.submit(len, e.submit(flaky, m3))])
    assert e.submit(len, e.submit(flaky, m3)).result(timeout=30) == 2


# ---------------------------------------------------------------- case 16
@pytest.mark.slow
def test_result_timeout_raises_builtin_timeout_error(e):
    f = e.submit(slow_value, "done", 6.0, pure=False)
    for call in [lambda: f.result(timeout=0.5),
                 lambda: f.exception(timeout=0.5),
                 lambda: wait([f], timeout=0.5),
                 lambda: next(iter(as_completed([f], timeout=0.5))),
                 lambda: e.gather([f], timeout=0.5)]:
        t0 = time.time()
        try:
            call()
        except TimeoutError:  # the builtin
            pass
        else:
            pytest.fail("no TimeoutError while the task is still running")
        assert time.time() - t0 < 2.5
    assert not f.done() and not f.cancelled()  # a timeout does not cancel
    assert f.result(timeout=30) == "done"


# ---------------------------------------------------------------- case 17
def _raises_promptly(call):
    t0 = time.time()
    with pytest.raises(Exception) as info:
        call()
    assert not isinstance(info.value, TimeoutError), "hung instead of failing"
    assert time.time() - t0 < 45


@pytest.mark.timeout(300)
def test_unpicklable_results_raise_and_executor_survives(e):
    workers = sorted(e.ncores())
    for i, maker in enumerate([make_lock, make_list_with_lock, make_bad]):
        f = e.submit(maker, pure=False)
        _raises_promptly(lambda: f.result(timeout=60))
        _raises_promptly(lambda: e.gather([f], timeout=60))
        assert e.submit(inc, i).result(timeout=30) == i + 1

        # moving the value to another worker fails too, instead of looping
        src = e.submit(maker, workers=[workers[0]], pure=False)
        dst = e.submit(type_name, src, workers=[workers[-1]])
        _raises_promptly(lambda: dst.result(timeout=60))
        assert e.submit(inc, 10 + i).result(timeout=30) == 11 + i


# ---------------------------------------------------------------- case 18
def test_map_duplicates_keep_one_future_per_input(e):
    fs = e.map(inc, [1, 1, 2, 1])
    assert len(fs) == 4
    assert fs[0].key == fs[1].key == fs[3].key != fs[2].key
    assert e.gather(fs) == [2, 2, 3, 2]
    items = list(as_completed(fs, timeout=30))
    assert len(items) == 4
    assert sorted(f.result(timeout=30) for f in items) == [2, 2, 2, 3]
    assert sorted(r for _, r in as_completed(fs, with_results=True, timeout=30)) == [2, 2, 2, 3]
    assert len(list(as_completed([fs[2], fs[2]], timeout=30))) == 2

    gs = e.map(add, [1, 1, 2], [5, 5, 5])
    assert gs[0].key == gs[1].key != gs[2].key
    assert e.gather(gs) == [6, 6, 7]


# ---------------------------------------------------------------- case 19
def test_compute_shared_keys_release_and_recompute(e):
    x = dask.delayed(inc)(1)
    y = dask.delayed(add)(x, 10)
    z = dask.delayed(add)(x, 20)

    pair = e.compute(y, z)
    assert isinstance(pair, list) and len(pair) == 2
    fy, fz = pair
    assert isinstance(fy, Future) and isinstance(fz, Future)
    assert (fy.result(timeout=30), fz.result(timeout=30)) == (12, 22)

    fy2 = e.compute(y)
    assert isinstance(fy2, Future)
    assert fy2.key == fy.key
    del pair, fy, fy2
    gc.collect()
    assert fz.result(timeout=30) == 22
    assert e.compute(z).result(timeout=30) == 22

    del fz
    gc.collect()
    again = e.compute(y)
    assert again.result(timeout=30) == 12
    assert e.gather(e.compute(y, z)) == [12, 22]


# ---------------------------------------------------------------- case 21
def _running(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_close_while_computing_returns_promptly():
    threads_before = set(threading.enumerate())
    ex = Executor()
    pids = [n.process.pid for n in ex.cluster.nannies if n.process is not None]
    assert pids
    fs = [ex.submit(slow, i, 120, pure=False) for i in range(4)]
    poll(lambda: ex.processing() and any(ex.processing().values()), timeout=30,
         msg="slow tasks running")

    box = {}

    def run():
        try:
            ex.close()
        except Exception as exc:
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "close() still blocked after 30 s with tasks running"
    assert "exc" not in box

    assert all(f.cancelled() for f in fs)  # abandoned, not waited for
    del fs
    # nothing left that would keep the interpreter from exiting
    poll(lambda: not any(_running(p) for p in pids), timeout=15, msg="worker processes gone")
    poll(lambda: not [th for th in threading.enumerate()
                      if th not in threads_before and not th.daemon and th.is_alive()],
         timeout=15, msg="no new non-daemon threads")


# ---------------------------------------------------------------- case 22
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_repeated_restart_with_busy_workers():
    with Executor() as ex:
        assert ex.submit(inc, 0).result(timeout=30) == 1
        busy = [ex.submit(slow, i, 60, pure=False) for i in range(3)]
        poll(lambda: ex.processing() and any(ex.processing().values()), timeout=30,
             msg="slow tasks running")
        n = _worker_count(ex)
        for i in range(1, 6):
            t0 = time.time()
            ex.restart()
            assert time.time() - t0 < 60, "restart #%d too slow" % i
            assert _worker_count(ex) == n
            assert ex.submit(inc, i).result(timeout=30) == i + 1
        assert all(f.cancelled() for f in busy)
