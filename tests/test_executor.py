"""Integration tests: an Executor against an in-process Scheduler and two
Workers on one event loop, talking over real TCP (``gen_cluster``).

Only the ``_``-coroutines and ``await future`` are used here; a blocking
method called on the loop would hang the test.
"""
import asyncio
import collections
import operator
import random
import threading
import uuid

import pytest

from distributed import CancelledError, Executor, as_completed
from distributed.utils_test import add, apoll, gen_cluster, inc, slowinc

pytestmark = pytest.mark.timeout(60)

# Workers run in this process, so module-level state is shared with them:
# these counters record how often a task body really ran.
CALLS = collections.Counter()
CALLS_LOCK = threading.Lock()    # two worker threads may run tasks at once


def count_calls(token, x):
    with CALLS_LOCK:
        CALLS[token] += 1
    return x


def add_kw(x, y=0, z=0):
    return x + y + z


def fails_with_value_error(x):
    raise ValueError("bad input %d" % x)


def flaky(token, fails):
    with CALLS_LOCK:
        CALLS[token] += 1
        n = CALLS[token]
    if n <= fails:
        raise ZeroDivisionError("attempt %d fails" % n)
    return n


def make_bytes(n):
    return b"x" * n


def total(*args, **kwargs):
    """Sum numbers found anywhere inside nested lists, tuples and dicts."""
    def walk(o):
        if isinstance(o, (list, tuple)):
            return sum(walk(i) for i in o)
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        return o
    return walk(args) + walk(kwargs)


def holders(key, *workers):
    return [w.address for w in workers if key in w.data]


# ---------------------------------------------------------------- submit and keys
@gen_cluster(executor=True)
async def test_submit_returns_value_when_awaited(e, s, a, b):
    x = e.submit(inc, 10)
    assert await x == 11
    assert x.status == "finished"
    assert x.done()
    assert s.state.tasks[x.key].state == "memory"
    assert len(holders(x.key, a, b)) == 1


@gen_cluster(executor=True)
async def test_futures_as_arguments_are_replaced_by_their_values(e, s, a, b):
    x = e.submit(inc, 1)
    y = e.submit(inc, 10)
    z = e.submit(add, x, y)
    assert await z == 13
    deps = {d.key for d in s.state.tasks[z.key].dependencies}
    assert deps == {x.key, y.key}


@gen_cluster(executor=True)
async def test_futures_nested_in_lists_dicts_and_tuples_are_replaced(e, s, a, b):
    x = e.submit(inc, 1)      # 2
    y = e.submit(inc, 2)      # 3
    z = e.submit(inc, 3)      # 4
    w = e.submit(total, [x, (y, 100)], {"k": z}, extra={"nested": [x]})
    assert await w == 2 + 3 + 100 + 4 + 2
    deps = {d.key for d in s.state.tasks[w.key].dependencies}
    assert deps == {x.key, y.key, z.key}


@gen_cluster(executor=True)
async def test_key_is_funcname_and_deterministic_token(e, s, a, b):
    x1 = e.submit(inc, 1)
    x2 = e.submit(inc, 1)
    y = e.submit(inc, 2)
    k1 = e.submit(add_kw, 1, y=2)
    k2 = e.submit(add_kw, 1, y=3)
    assert x1.key == x2.key
    assert x1.key.startswith("inc-") and len(x1.key) > len("inc-")
    assert y.key != x1.key
    assert k1.key.startswith("add_kw-")
    assert k1.key != k2.key
    assert await x1 == 2 and await y == 3 and await k1 == 3 and await k2 == 4


@gen_cluster(executor=True)
async def test_pure_false_gives_fresh_keys_and_runs_each_call(e, s, a, b):
    token = uuid.uuid4().hex
    x = e.submit(count_calls, token, 1, pure=False)
    y = e.submit(count_calls, token, 1, pure=False)
    assert x.key != y.key
    assert x.key.startswith("count_calls-")
    assert await x == 1 and await y == 1
    assert CALLS[token] == 2
    r1 = e.submit(random.random, pure=False)
    r2 = e.submit(random.random, pure=False)
    assert r1.key != r2.key
    assert await r1 != await r2


@gen_cluster(executor=True)
async def test_resubmitting_known_key_runs_function_once(e, s, a, b):
    token = uuid.uuid4().hex
    x = e.submit(count_calls, token, 42)
    assert await x == 42
    y = e.submit(count_calls, token, 42)      # same call, key already in memory
    z = e.submit(count_calls, token, 42)
    assert y.key == z.key == x.key
    assert await y == 42 and await z == 42
    assert CALLS[token] == 1
    ts = s.state.tasks[x.key]
    assert ts.state == "memory"
    assert len(ts.who_has) == 1
    assert len(holders(x.key, a, b)) == 1


@gen_cluster(executor=True)
async def test_same_key_from_two_executors_is_computed_once(e, s, a, b):
    token = uuid.uuid4().hex
    async with Executor(s.address, asynchronous=True, set_as_default=False) as e2:
        x = e.submit(count_calls, token, 7)
        y = e2.submit(count_calls, token, 7)
        assert x.key == y.key
        assert await x == 7 and await y == 7
        assert CALLS[token] == 1
        assert {cs.id for cs in s.state.tasks[x.key].who_wants} == {e.id, e2.id}
        key = x.key
        del x
        await apoll(lambda: key not in e.futures)
        # e2 still wants it: the data stays
        await e.submit(inc, 0)   # a round trip: e's release has reached the scheduler
        assert key in s.state.tasks
        assert await y == 7
    await apoll(lambda: key not in s.state.tasks, msg="key released after e2 closed")


# ---------------------------------------------------------------- map and gather
@gen_cluster(executor=True)
async def test_map_over_a_list(e, s, a, b):
    futures = e.map(inc, range(20))
    assert len(futures) == 20
    assert len({f.key for f in futures}) == 20
    assert await e._gather(futures) == list(range(1, 21))


@gen_cluster(executor=True)
async def test_map_over_several_iterables_stops_at_the_shortest(e, s, a, b):
    futures = e.map(add, [1, 2, 3], [10, 20, 30, 40])
    assert await e._gather(futures) == [11, 22, 33]
    gen = e.map(operator.mul, iter(range(4)), (x for x in [2, 2, 2, 2]))
    assert await e._gather(gen) == [0, 2, 4, 6]


@gen_cluster(executor=True)
async def test_map_broadcasts_keyword_arguments_including_futures(e, s, a, b):
    assert await e._gather(e.map(add_kw, range(3), y=10)) == [10, 11, 12]
    y = e.submit(inc, 99)
    futures = e.map(add_kw, range(3), y=y, z=1)
    assert await e._gather(futures) == [101, 102, 103]
    for f in futures:
        assert y.key in {d.key for d in s.state.tasks[f.key].dependencies}
    # different kwargs, different keys
    assert e.map(add_kw, [1], y=1)[0].key != e.map(add_kw, [1], y=2)[0].key


@gen_cluster(executor=True)
async def test_map_and_submit_of_the_same_call_share_a_key(e, s, a, b):
    # map is documented as "submit once per element"
    token = uuid.uuid4().hex
    x = e.submit(count_calls, token, 3)
    [y] = e.map(count_calls, [token], [3])
    assert y.key == x.key
    assert await x == 3 and await y == 3
    assert CALLS[token] == 1


@gen_cluster(executor=True)
async def test_map_keys_are_deterministic(e, s, a, b):
    k1 = [f.key for f in e.map(inc, range(5))]
    k2 = [f.key for f in e.map(inc, range(5))]
    assert k1 == k2
    assert all(k.startswith("inc-") for k in k1)


@gen_cluster(executor=True)
async def test_gather_keeps_nested_structure(e, s, a, b):
    x, y, z = e.submit(inc, 1), e.submit(inc, 2), e.submit(inc, 3)
    out = await e._gather({"a": [x, y], "b": (z, 5), "c": {"d": x}, "e": "plain"})
    assert out == {"a": [2, 3], "b": (4, 5), "c": {"d": 2}, "e": "plain"}
    assert await e._gather(x) == 2
    assert await e._gather([[x], [y, [z]]]) == [[2], [3, [4]]]


# ---------------------------------------------------------------- errors
@gen_cluster(executor=True)
async def test_exception_has_original_type_and_remote_traceback(e, s, a, b):
    x = e.submit(fails_with_value_error, 3)
    with pytest.raises(ValueError, match="bad input 3") as info:
        await x
    assert x.status == "error"
    tb = x.traceback(timeout=0)     # done: returns at once
    assert isinstance(tb, str)
    assert "fails_with_value_error" in tb
    assert 'raise ValueError("bad input %d" % x)' in tb
    assert "bad input 3" in str(info.value.__cause__)
    exc = await x._exception()
    assert type(exc) is ValueError
    assert s.state.tasks[x.key].state == "erred"


@gen_cluster(executor=True)
async def test_dependents_of_a_failed_task_fail_with_its_exception(e, s, a, b):
    x = e.submit(fails_with_value_error, 1)
    y = e.submit(inc, x)
    z = e.submit(add, y, e.submit(inc, 1))
    for f in (y, z):
        with pytest.raises(ValueError, match="bad input 1"):
            await f
        assert f.status == "error"
    assert "fails_with_value_error" in z.traceback(timeout=0)
    with pytest.raises(ValueError):
        await e._gather([e.submit(inc, 5), z])
    assert await e._gather([e.submit(inc, 5), z], errors="skip") == [6]


@gen_cluster(executor=True)
async def test_retries_rerun_a_failing_task(e, s, a, b):
    token = uuid.uuid4().hex
    x = e.submit(flaky, token, 2, retries=2)
    assert await x == 3
    assert CALLS[token] == 3

    token2 = uuid.uuid4().hex
    y = e.submit(flaky, token2, 2, retries=1)
    with pytest.raises(ZeroDivisionError, match="attempt 2 fails"):
        await y
    assert CALLS[token2] == 2


# ---------------------------------------------------------------- reference counting
@gen_cluster(executor=True)
async def test_deleting_the_last_future_releases_data_everywhere(e, s, a, b):
    x = e.submit(inc, 1)
    assert await x == 2
    key = x.key
    assert key in s.state.tasks and holders(key, a, b)
    del x
    await apoll(lambda: key not in s.state.tasks, msg="key forgotten by the scheduler")
    await apoll(lambda: not holders(key, a, b), msg="data freed on the workers")
    assert key not in e.futures and key not in e.refcount


@gen_cluster(executor=True)
async def test_released_dependency_data_is_freed_but_task_kept_for_its_dependent(e, s, a, b):
    x = e.submit(make_bytes, 1000)
    y = e.submit(len, x)
    assert await y == 1000
    xkey, ykey = x.key, y.key
    del x
    # y has run, so x's data is not needed; its task is kept (released) only
    # so that y could be recomputed
    await apoll(lambda: not holders(xkey, a, b), msg="x freed on the workers")
    await apoll(lambda: s.state.tasks[xkey].state == "released")
    assert not s.state.tasks[xkey].who_has
    assert xkey not in e.futures and xkey not in e.refcount
    assert await y == 1000
    del y
    await apoll(lambda: xkey not in s.state.tasks and ykey not in s.state.tasks)
    await apoll(lambda: not a.data and not b.data)


@gen_cluster(executor=True)
async def test_two_futures_for_one_key_share_a_refcount(e, s, a, b):
    x = e.submit(inc, 1)
    y = e.submit(inc, 1)
    assert x.key == y.key
    key = x.key
    assert e.refcount[key] == 2
    assert set(e.futures) == {key}
    await x
    del x
    await apoll(lambda: e.refcount.get(key) == 1)
    await e.submit(inc, 1000)     # round trip: anything sent before has arrived
    assert key in s.state.tasks
    assert s.state.tasks[key].state == "memory"
    assert holders(key, a, b)
    assert await y == 2
    del y
    await apoll(lambda: key not in e.futures and key not in e.refcount)
    await apoll(lambda: key not in s.state.tasks and not holders(key, a, b))


@gen_cluster(executor=True)
async def test_refcount_and_futures_track_live_future_objects(e, s, a, b):
    fs = e.map(inc, range(3))
    g = e.map(inc, [0])[0]            # same key as fs[0]
    assert set(e.futures) == {f.key for f in fs}
    assert {k: e.refcount[k] for k in e.futures} == {fs[0].key: 2, fs[1].key: 1, fs[2].key: 1}
    await e._gather(fs)
    k1 = fs[1].key
    del fs[1]
    await apoll(lambda: k1 not in e.futures)
    assert k1 not in e.refcount
    del g
    await apoll(lambda: e.refcount.get(fs[0].key) == 1)
    assert fs[0].key in e.futures


@gen_cluster(executor=True)
async def test_release_then_resubmit_same_key_computes_again(e, s, a, b):
    token = uuid.uuid4().hex
    x = e.submit(count_calls, token, 5)
    assert await x == 5
    key = x.key
    del x
    await apoll(lambda: key not in s.state.tasks and not holders(key, a, b))
    x = e.submit(count_calls, token, 5)
    assert x.key == key
    assert await x == 5
    assert CALLS[token] == 2


# ---------------------------------------------------------------- cancel
@gen_cluster(executor=True)
async def test_cancel_pending_future(e, s, a, b):
    x = e.submit(slowinc, 1, delay=1.0)
    y = e.submit(inc, x)
    key = x.key
    await apoll(lambda: key in s.state.tasks)
    await e._cancel([x])
    assert x.cancelled()
    assert x.status == "cancelled"
    with pytest.raises(CancelledError):
        await x
    with pytest.raises(CancelledError):
        await e._gather([x])
    await apoll(lambda: key not in e.futures)
    # its dependent still wants it: the scheduler keeps the task for y only
    del y
    await apoll(lambda: key not in s.state.tasks, timeout=5)
    await apoll(lambda: not holders(key, a, b), timeout=5)
    # the cluster still works, and the key can be submitted again
    z = e.submit(slowinc, 1, delay=0.01)
    assert await z == 2


@gen_cluster(executor=True)
async def test_cancel_finished_future_frees_data(e, s, a, b):
    x = e.submit(inc, 1)
    await x
    key = x.key
    await e._cancel([x])
    assert x.cancelled()
    await apoll(lambda: key not in s.state.tasks and not holders(key, a, b))


# ---------------------------------------------------------------- placement
@gen_cluster(executor=True)
async def test_task_runs_where_its_big_dependency_is(e, s, a, b):
    bigs = [e.submit(make_bytes, 5_000_000 + i) for i in range(4)]
    await asyncio.gather(*[f._state.wait() for f in bigs])
    sizes = [e.submit(len, big) for big in bigs]
    assert await e._gather(sizes) == [5_000_000 + i for i in range(4)]
    for big, size in zip(bigs, sizes):
        assert holders(size.key, a, b) == holders(big.key, a, b)
        assert len(holders(big.key, a, b)) == 1


@gen_cluster(executor=True)
async def test_workers_restriction_is_respected(e, s, a, b):
    futures = e.map(inc, range(10), workers=[b.address])
    assert await e._gather(futures) == list(range(1, 11))
    for f in futures:
        assert holders(f.key, a, b) == [b.address]
    x = e.submit(inc, 100, workers=a.address)
    assert await x == 101
    assert holders(x.key, a, b) == [a.address]
    # a dependent restricted to the other worker fetches the data
    y = e.submit(inc, x, workers=[b.address])
    assert await y == 102
    assert holders(y.key, a, b) == [b.address]


# ---------------------------------------------------------------- dask graphs
@gen_cluster(executor=True)
async def test_get_dict_graph_with_nested_keys(e, s, a, b):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "x", "y"), "w": (sum, ["x", "y", "z"])}
    assert await e._get(dsk, [["x", "y"], ["z", ["w"]]]) == [[1, 2], [3, [6]]]
    # nothing is held once the results are back
    await apoll(lambda: not s.state.tasks, msg="graph keys released after get")
    await apoll(lambda: not a.data and not b.data)


@gen_cluster(executor=True)
async def test_get_single_key_returns_bare_value(e, s, a, b):
    dsk = {"x": 1, "y": (inc, "x"), "w": (sum, ["x", "y"])}
    assert await e._get(dsk, "w") == 3


@gen_cluster(executor=True)
async def test_get_right_after_get_of_same_graph(e, s, a, b):
    # the second call starts before the first call's Futures are released
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "x", "y"), "w": (sum, ["x", "y", "z"])}
    assert await e._get(dsk, [["x", "y"], ["z"]]) == [[1, 2], [3]]
    assert await e._get(dsk, ["z", ["w"]]) == [3, [6]]
    assert await e._get(dsk, ["z", "y"]) == [3, 2]


@gen_cluster(executor=True)
async def test_compute_dask_delayed(e, s, a, b):
    dask = pytest.importorskip("dask")
    x = dask.delayed(inc)(1)
    y = dask.delayed(add)(x, 10)
    f = e.compute(y)
    assert await f == 12
    fs = e.compute([x, y])
    assert await e._gather(fs) == [2, 12]


@gen_cluster(executor=True)
async def test_compute_dask_array(e, s, a, b):
    da = pytest.importorskip("dask.array")
    np = pytest.importorskip("numpy")
    x = da.arange(100, chunks=10)
    f = e.compute((x * 2).sum())
    assert await f == 2 * sum(range(100))
    g = e.compute(x[:15] + 1)
    np.testing.assert_array_equal(await g, np.arange(15) + 1)


# ---------------------------------------------------------------- as_completed and restart
@gen_cluster(executor=True)
async def test_as_completed_async_iteration(e, s, a, b):
    futures = e.map(slowinc, range(6), delay=0.05)
    seen = []
    async for f in as_completed(futures, timeout=20):
        assert f.done()
        seen.append(await f)
    assert sorted(seen) == list(range(1, 7))

    futures = e.map(inc, range(3))
    pairs = []
    async for f, value in as_completed(futures, with_results=True, timeout=20):
        pairs.append((f.key, value))
    assert sorted(v for _, v in pairs) == [1, 2, 3]
    assert {k for k, _ in pairs} == {f.key for f in futures}


@gen_cluster(executor=True)
async def test_restart_cancels_futures_and_cluster_keeps_working(e, s, a, b):
    x = e.submit(inc, 1)
    y = e.submit(slowinc, 2, delay=2.0)
    await x
    await e._restart(timeout=20)
    assert x.cancelled() and y.cancelled()
    with pytest.raises(CancelledError):
        await x
    with pytest.raises(CancelledError):
        await y
    assert not e.futures and not e.refcount
    assert not s.state.tasks
    await apoll(lambda: not a.data and not b.data)
    z = e.submit(inc, 1)      # same key as x: computed afresh
    assert z.key == x.key
    assert await z == 2
    assert not z.cancelled()


# ---------------------------------------------------------------- scatter, replicate, run
def where_am_i(x=None):
    from distributed import get_worker

    return get_worker().address


def raise_key_error():
    raise KeyError("nothing here")


@gen_cluster(executor=True)
async def test_scatter_keeps_the_shape_and_tasks_use_the_data_where_it_is(e, s, a, b):
    one = e.scatter(41)
    several = e.scatter([1, 2, 3])
    named = e.scatter({"alpha": 10, "beta": 20})
    assert one.key.startswith("int-")
    assert [f.key.split("-")[0] for f in several] == ["int", "int", "int"]
    assert set(named) == {"alpha", "beta"} and named["alpha"].key == "alpha"
    assert await one == 41
    assert await e._gather(several) == [1, 2, 3]
    assert await e._gather(named) == {"alpha": 10, "beta": 20}
    assert await e.submit(inc, one) == 42
    assert await e.submit(total, several, named) == 36
    # the data lives on a worker, not in the scheduler's memory
    assert one.key in a.data or one.key in b.data
    assert e.dask[one.key].value == 41


@gen_cluster(executor=True)
async def test_scatter_keys_are_tokens_of_the_data_unless_hash_is_false(e, s, a, b):
    x, y = e.scatter([[1, 2], [1, 2]])
    assert x.key == y.key
    assert x.key == e.scatter([[1, 2]])[0].key
    z, w = e.scatter([[1, 2], [1, 2]], hash=False)
    assert len({x.key, z.key, w.key}) == 3
    assert await e._gather([x, z, w]) == [[1, 2]] * 3
    with pytest.raises(TypeError, match="already Futures"):
        e.scatter([x])


@gen_cluster(executor=True)
async def test_scatter_to_chosen_workers_and_broadcast_to_all(e, s, a, b):
    x = e.scatter(b"payload", workers=[b.address])
    assert await x == b"payload"
    assert x.key in b.data and x.key not in a.data
    y = await e._scatter(list(range(50)), broadcast=True)
    await apoll(lambda: all(f.key in a.data and f.key in b.data for f in y), timeout=10)
    assert sorted((await e._who_has(y[:1]))[y[0].key]) == sorted([a.address, b.address])
    z = e.scatter("replicate me", workers=[a.address])
    await e._replicate([z], n=2)
    await apoll(lambda: z.key in b.data, timeout=10)
    # the copies go when the key is released
    key = z.key
    del z
    await apoll(lambda: key not in a.data and key not in b.data, timeout=10)


@gen_cluster(executor=True)
async def test_run_calls_a_function_on_every_worker_and_raises_its_error(e, s, a, b):
    assert await e._run(where_am_i) == {a.address: a.address, b.address: b.address}
    assert await e._run(where_am_i, 1, workers=[b.address]) == {b.address: b.address}
    with pytest.raises(KeyError, match="nothing here"):
        await e._run(raise_key_error)
    # inside a task, get_worker() is the worker running it
    f = e.submit(where_am_i, 5, workers=[a.address])
    assert await f == a.address


@gen_cluster(executor=True)
async def test_scatter_of_an_iterable_object_sends_it_whole(e, s, a, b):
    import numpy as np

    arr = np.arange(10)
    x = e.scatter(arr)
    assert x.key.startswith("ndarray-")
    assert (await x).tolist() == list(range(10))
    gen = e.scatter(i * i for i in range(3))
    assert await e._gather(gen) == [0, 1, 4]


@gen_cluster(executor=True)
async def test_allow_other_workers_runs_a_task_restricted_to_an_absent_worker(e, s, a, b):
    f = e.submit(inc, 1, workers=["tcp://127.0.0.1:1"], allow_other_workers=True)
    assert await f == 2
    g = e.map(inc, [10, 20], workers=["nobody"], allow_other_workers=True)
    assert await e._gather(g) == [11, 21]
    h = e.submit(inc, 5, workers=[b.address], allow_other_workers=True)
    assert await h == 6 and h.key in b.data
