"""dask collections on real local clusters.

Every collection test computes the same collection twice, once with dask's
synchronous scheduler and once on the cluster, and compares the values.
The other tests cover the ways dask reaches an Executor (``scheduler=``,
the ``get=`` shim, the default-client path), ``Executor.get`` on
hand-written graphs, a graph of 100,000 tasks, a dataframe over ~200 MB of
CSV files, and ``visualize``.

Worker processes cannot import this module (``tests/`` is not on their
path), so its functions and classes are pickled by value.
"""
import gc
import operator
import os
import shutil
import subprocess
import sys
import time
import warnings
from functools import reduce

import cloudpickle
import numpy as np
import pandas as pd
import pytest

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
from dask import delayed
from dask._task_spec import Alias, Task, TaskRef

import distributed
from distributed import Client, Executor, Future, default_client, futures_of, get_client, wait
from distributed import _dask_compat
from distributed._dask_compat import GetKeywordWarning
from distributed.utils_test import add, cluster, inc, poll

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def executor():
    """One local cluster (two single-thread worker processes) for the module.

    It is not dask's default scheduler (``set_as_default=False``), so that
    ``test_default_scheduler_registration_and_unregistration`` can check
    what happens with and without a default Executor."""
    e = Executor(n_workers=2, set_as_default=False)
    try:
        yield e
    finally:
        e.close()


# ---------------------------------------------------------------- helpers
class CustomError(Exception):
    """Defined here (pickled by value): must come back as this very class."""


def fail_custom(x):
    raise CustomError("custom failure on %r" % (x,))


def record_and_fail(path):
    with open(path, "w") as f:
        f.write("ran")
    return 1 / 0


def to_lists(x):
    """Tuples and lists to nested lists, for comparing ``get`` results
    (dask's sync get returns tuples, ours lists: both are allowed)."""
    if isinstance(x, (list, tuple)):
        return [to_lists(i) for i in x]
    return x


def assert_same(result, expected):
    assert type(result) is type(expected), (type(result), type(expected))
    if isinstance(expected, np.ndarray):
        assert result.shape == expected.shape and result.dtype == expected.dtype
        np.testing.assert_allclose(result, expected, rtol=1e-12, atol=0)
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(result, expected, check_exact=False, rtol=1e-12)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(result, expected, check_exact=False, rtol=1e-12)
    elif isinstance(expected, (float, np.floating)):
        assert result == pytest.approx(expected, rel=1e-12)
    else:
        assert result == expected


# ---------------------------------------------------------------- collections
def _array():
    return da.random.default_rng(42).random((60, 40), chunks=(15, 10))


def _words():
    return ["apple", "banana", "cherry", "date", "elder", "fig", "grape"]


def _bag():
    return db.from_sequence(range(200), npartitions=7)


def _frame():
    rng = np.random.default_rng(7)
    n = 400
    pdf = pd.DataFrame({
        "key": rng.integers(0, 20, n),
        "value": rng.random(n),
        "x": rng.integers(0, 1000, n).astype("int64"),
        "name": rng.choice(_words(), n),
    })
    return dd.from_pandas(pdf, npartitions=5)


def _right_frame():
    pdf = pd.DataFrame({"key": np.arange(0, 20, 2), "label": ["k%d" % i for i in range(0, 20, 2)]})
    return dd.from_pandas(pdf, npartitions=2)


def _sorted_frame(df):
    """Order-insensitive form of a frame whose row order dask leaves open."""
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def _sorted_groups(pairs):
    return sorted((k, sorted(v)) for k, v in pairs)


def _tree(n):
    level = [delayed(inc)(i) for i in range(n)]
    while len(level) > 1:
        level = [delayed(add)(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0]


# name -> (builder of a collection, normaliser of its computed value)
CASES = {
    # dask.array
    "array-sum": (lambda: _array().sum(), None),
    "array-sum-axis0": (lambda: _array().sum(axis=0), None),
    "array-mean-axis1": (lambda: _array().mean(axis=1), None),
    "array-std-axis0": (lambda: _array().std(axis=0), None),
    "array-std": (lambda: _array().std(), None),
    "array-argmax-axis0": (lambda: _array().argmax(axis=0), None),
    "array-argmax-axis1": (lambda: _array().argmax(axis=1), None),
    "array-rechunk": (lambda: _array().rechunk((7, 13)), None),
    "array-rechunk-sum": (lambda: _array().rechunk((60, 3)).sum(axis=1), None),
    "array-matmul": (lambda: _array().dot(_array().T), None),
    "array-slice": (lambda: _array()[::3, 5:33], None),
    "array-concatenate": (lambda: da.concatenate([_array()[:10], _array()[-7:]], axis=0), None),
    "array-elementwise-transpose": (lambda: (_array() + _array().T.T * 2)[5:50].T, None),
    # dask.bag
    "bag-map-filter": (lambda: _bag().map(lambda x: x * 3).filter(lambda x: x % 2 == 0), None),
    "bag-sum": (lambda: _bag().map(inc).sum(), None),
    "bag-foldby": (lambda: _bag().foldby(lambda x: x % 7, operator.add, 0, operator.add, 0),
                   sorted),
    "bag-frequencies": (lambda: db.from_sequence(_words() * 5 + _words()[:3], npartitions=4)
                        .frequencies(), sorted),
    "bag-groupby": (lambda: _bag().groupby(lambda x: x % 5), _sorted_groups),
    "bag-distinct": (lambda: _bag().map(lambda x: x % 13).distinct(), sorted),
    # dask.dataframe
    "df-groupby-sum": (lambda: _frame().groupby("key").value.sum(), None),
    "df-groupby-mean": (lambda: _frame().groupby("key")[["value", "x"]].mean(), None),
    "df-groupby-count": (lambda: _frame().groupby("key").count(), None),
    "df-groupby-agg-dict": (lambda: _frame().groupby("key").agg({"value": "sum", "x": "max",
                                                                 "name": "count"}), None),
    "df-set-index": (lambda: _frame().set_index("x"), None),
    "df-sort-values": (lambda: _frame().sort_values(["value"]), None),
    "df-shuffle-on-column": (lambda: _frame().shuffle("key"), _sorted_frame),
    "df-merge": (lambda: _frame().merge(_right_frame(), on="key"), _sorted_frame),
    "df-merge-left": (lambda: _frame().merge(_right_frame(), on="key", how="left"),
                      _sorted_frame),
    "df-drop-duplicates": (lambda: _frame()[["key", "name"]].drop_duplicates(), _sorted_frame),
    "df-column-arithmetic": (lambda: (_frame().value * 2 + _frame().x).sum(), None),
    # dask.delayed
    "delayed-nested": (lambda: delayed(add)(delayed(inc)(1),
                                            delayed(operator.mul)(delayed(inc)(2), 3)), None),
    "delayed-tree": (lambda: _tree(100), None),
    "delayed-list-arg": (lambda: delayed(sum)([delayed(inc)(i) for i in range(20)]), None),
    "delayed-dict-result": (lambda: delayed(dict)(a=delayed(inc)(1), b=[delayed(inc)(2), 5]),
                            None),
    "delayed-of-array": (lambda: delayed(np.sum)(_array()), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_collection_on_cluster_matches_sync_scheduler(executor, name):
    build, normalise = CASES[name]
    coll = build()
    expected = coll.compute(scheduler="sync")
    result = coll.compute(scheduler=executor)
    if normalise is not None:
        expected, result = normalise(expected), normalise(result)
    assert_same(result, expected)


def test_numpy_results_against_numpy(executor):
    """Not only equal to dask's sync scheduler, but right."""
    x = _array()
    a = x.compute(scheduler="sync")
    s, m, am, prod = dask.compute(x.sum(axis=1), x.mean(), x.argmax(axis=0), x.dot(x.T),
                                  scheduler=executor)
    np.testing.assert_allclose(s, a.sum(axis=1))
    assert m == pytest.approx(a.mean())
    np.testing.assert_array_equal(am, a.argmax(axis=0))
    np.testing.assert_allclose(prod, a @ a.T)


def test_delayed_zero_division_reraises_original_type(executor):
    x = delayed(operator.truediv)(1, 0)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        x.compute(scheduler=executor)
    with pytest.raises(ZeroDivisionError):
        executor.compute(x).result(timeout=30)


def test_bag_map_key_error_reraises_original_type(executor):
    b = db.from_sequence([{"a": 1}, {"b": 2}, {"a": 3}], npartitions=2).map(lambda d: d["a"])
    with pytest.raises(KeyError, match="'a'"):
        b.compute(scheduler=executor)


def test_dataframe_error_reraises_original_type(executor):
    df = _frame().map_partitions(lambda p: p.assign(z=p["no_such_column"]),
                                 meta=_frame()._meta.assign(z=1.0))
    with pytest.raises(KeyError, match="no_such_column"):
        df.compute(scheduler=executor)


def test_error_of_class_defined_in_test_module_keeps_its_class(executor):
    with pytest.raises(CustomError, match="custom failure on 3"):
        delayed(fail_custom)(3).compute(scheduler=executor)


def test_cluster_keeps_working_after_errors(executor):
    with pytest.raises(ZeroDivisionError):
        delayed(operator.truediv)(1, 0).compute(scheduler=executor)
    assert _bag().map(inc).sum().compute(scheduler=executor) == sum(range(1, 201))


# ---------------------------------------------------------------- ways to reach the cluster
def _pid_on_cluster():
    """A delayed whose value tells which process ran it (fresh key each time)."""
    return delayed(os.getpid, pure=False)()


def test_scheduler_forms_give_right_value_on_cluster(executor):
    x = _array()
    expected = x.sum().compute(scheduler="sync")
    me = os.getpid()
    assert x.sum().compute(scheduler=executor) == pytest.approx(expected)
    assert x.sum().compute(scheduler=executor.get) == pytest.approx(expected)
    assert _pid_on_cluster().compute(scheduler=executor) != me
    assert _pid_on_cluster().compute(scheduler=executor.get) != me
    assert _pid_on_cluster().compute(scheduler="sync") == me


def test_get_keyword_gives_right_value_and_warns(executor):
    x = _array()
    expected = x.sum().compute(scheduler="sync")
    _dask_compat._warned.clear()  # the warning is once per process
    with pytest.warns(FutureWarning) as record:
        assert x.sum().compute(get=executor.get) == pytest.approx(expected)
    assert any(issubclass(w.category, GetKeywordWarning) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GetKeywordWarning)
        assert _pid_on_cluster().compute(get=executor.get) != os.getpid()
        a, b = dask.compute(x.sum(), x.mean(), get=executor.get)
    assert a == pytest.approx(expected)
    assert b == pytest.approx(expected / x.size)


def test_get_keyword_warns_exactly_once_per_process():
    script = (
        "import warnings\n"
        "import dask, dask.array as da, distributed\n"
        "from distributed._dask_compat import GetKeywordWarning\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = da.ones(6, chunks=2)\n"
        "    a = x.sum().compute(get=dask.get)\n"
        "    b = x.sum().compute(get=dask.get)\n"
        "    c = x.persist(get=dask.get).sum().compute()\n"
        "n = sum(issubclass(i.category, GetKeywordWarning) for i in w)\n"
        "f = sum(issubclass(i.category, FutureWarning) for i in w)\n"
        "where = [(i.filename, i.lineno) for i in w if issubclass(i.category, GetKeywordWarning)]\n"
        "print(n, f, a, b, c, *where[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=100, env=env)
    assert out.returncode == 0, out.stderr
    # the warning names the user's line (line 7 of the script), not dask's
    assert out.stdout.split() == ["1", "1", "6.0", "6.0", "6.0", "<string>", "7"]


def test_get_and_scheduler_together_raise_type_error(executor):
    x = _array().sum()
    with pytest.raises(TypeError):
        x.compute(get=executor.get, scheduler=executor)
    with pytest.raises(TypeError):
        dask.compute(x, get=executor.get, scheduler="sync")
    with pytest.raises(TypeError):
        x.persist(get=executor.get, scheduler=executor)


@pytest.mark.filterwarnings("ignore:Computing mixed collections:UserWarning")
def test_dask_compute_of_several_collections(executor):
    x = _array()
    df = _frame()
    b = _bag()
    xs, dfs, bs = dask.compute(x.sum(axis=0), df.groupby("key").value.sum(), b.map(inc),
                               scheduler=executor)
    es, edfs, ebs = dask.compute(x.sum(axis=0), df.groupby("key").value.sum(), b.map(inc),
                                 scheduler="sync")
    assert_same(xs, es)
    assert_same(dfs, edfs)
    assert bs == ebs


@pytest.mark.filterwarnings("ignore:Computing mixed collections:UserWarning")
def test_executor_compute_returns_one_future_per_collection(executor):
    x = _array()
    df = _frame()
    f = executor.compute(x.sum())
    assert isinstance(f, Future)
    assert f.result(timeout=30) == pytest.approx(x.sum().compute(scheduler="sync"))
    assert f.key in executor.dask
    fs = executor.compute(x.mean(axis=0), df.groupby("key").x.max())
    assert isinstance(fs, list) and len(fs) == 2
    assert_same(fs[0].result(timeout=30), x.mean(axis=0).compute(scheduler="sync"))
    assert_same(fs[1].result(timeout=30), df.groupby("key").x.max().compute(scheduler="sync"))
    fs2 = executor.compute([x.max(), delayed(inc)(1)])
    assert [g.result(timeout=30) for g in fs2] == [
        pytest.approx(x.max().compute(scheduler="sync")), 2]
    key = f.key
    del f
    gc.collect()
    poll(lambda: key not in executor.dask, timeout=10, msg="released key leaves executor.dask")


def test_executor_compute_sync_returns_values(executor):
    x = _array()
    assert executor.compute(x.sum(), sync=True) == pytest.approx(
        x.sum().compute(scheduler="sync"))
    total, answer = executor.compute([x.sum(), delayed(inc)(41)], sync=True)
    assert total == pytest.approx(x.sum().compute(scheduler="sync")) and answer == 42


def test_executor_dask_holds_a_computation_until_its_future_goes(executor):
    """executor.dask is the graph of what is still held: a finished compute's
    intermediate tasks leave it with the result's Future (a 100k-task compute
    used to leave every one of them in the client)."""
    before = set(executor.dask)
    x = da.arange(400, chunks=10)
    f = executor.compute((x + 1).sum())
    assert f.result(timeout=30) == sum(range(1, 401))
    added = set(executor.dask) - before
    assert f.key in added
    assert len(added) > 40  # the chunks and the reduction tree, not just the result
    del f
    gc.collect()
    poll(lambda: not (set(executor.dask) - before), timeout=10,
         msg="every task of the released compute leaves executor.dask")


def test_persist_with_scheduler_returns_collection_backed_by_futures(executor):
    x = _array()
    y = x.persist(scheduler=executor)
    fs = futures_of(y)
    assert fs and all(isinstance(f, Future) and f.executor is executor for f in fs)
    assert len(fs) == x.npartitions
    done, not_done = wait(y, timeout=30)
    assert not not_done
    expected = x.compute(scheduler="sync")
    np.testing.assert_allclose(y.compute(scheduler=executor), expected)
    np.testing.assert_allclose((y + 1).sum(axis=0).compute(scheduler=executor),
                               (expected + 1).sum(axis=0))


@pytest.mark.filterwarnings("ignore:Computing mixed collections:UserWarning")
def test_persist_forms_for_array_dataframe_and_bag(executor):
    x, df, b = _array(), _frame(), _bag().map(inc)
    px = executor.persist(x)
    pdf, pb = executor.persist([df, b])
    dx, ddf = dask.persist(x, df, scheduler=executor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GetKeywordWarning)
        gx = x.persist(get=executor.get)
    for p in (px, pdf, pb, dx, ddf, gx):
        assert futures_of(p), p
    ex = x.compute(scheduler="sync")
    for p in (px, dx, gx):
        np.testing.assert_allclose(p.compute(scheduler=executor), ex)
    edf = df.compute(scheduler="sync")
    for p in (pdf, ddf):
        pd.testing.assert_frame_equal(p.compute(scheduler=executor), edf)
        pd.testing.assert_series_equal(p.groupby("key").value.sum().compute(scheduler=executor),
                                       edf.groupby("key").value.sum())
    assert pb.compute(scheduler=executor) == list(range(1, 201))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_default_scheduler_registration_and_unregistration():
    x = _array()
    expected = x.sum().compute(scheduler="sync")
    with pytest.raises(ValueError):
        default_client()
    e = Executor(n_workers=1)
    try:
        assert dask.base.get_scheduler() == e.get
        assert default_client() is e
        assert get_client() is e
        assert Client.current(allow_global=True) is e
        from distributed.worker import get_client as worker_get_client

        assert worker_get_client() is e
        # plain compute goes to the cluster
        assert _pid_on_cluster().compute() != os.getpid()
        assert x.sum().compute() == pytest.approx(expected)
        assert x.sum().compute(scheduler="distributed") == pytest.approx(expected)
        assert _pid_on_cluster().compute(scheduler="distributed") != os.getpid()
        a, b = dask.compute(x.sum(), _bag().map(inc).sum())
        assert a == pytest.approx(expected) and b == sum(range(1, 201))
        # dataframe shuffles and merges with a default client (dask's p2p trap)
        df = _frame()
        merged = df.merge(_right_frame(), on="key").compute()
        pd.testing.assert_frame_equal(
            _sorted_frame(merged),
            _sorted_frame(df.merge(_right_frame(), on="key").compute(scheduler="sync")))
        pd.testing.assert_frame_equal(df.set_index("x").compute(),
                                      df.set_index("x").compute(scheduler="sync"))
        y = x.persist()
        assert futures_of(y)
    finally:
        e.close()
    with pytest.raises(ValueError):
        default_client()
    with pytest.raises(ValueError):
        get_client()
    assert dask.base.get_scheduler() is None
    assert _pid_on_cluster().compute() == os.getpid()
    assert x.sum().compute() == pytest.approx(expected)
    with pytest.raises(RuntimeError, match="no Client active"):
        x.sum().compute(scheduler="distributed")


# ---------------------------------------------------------------- Executor.get on dict graphs
LEGACY = {
    "x": 1,
    "y": (inc, "x"),
    "z": (add, "x", "y"),
    "w": (sum, ["x", "y", "z"]),
    ("t", 0): (inc, "z"),
    ("t", 1): (add, ("t", 0), 10),
}


@pytest.mark.parametrize("keys", [
    "z",
    "w",
    ("t", 1),
    ["x", "y", "z"],
    [["x", "y"], ["z", ["w"]]],
    ["y", "y", "z", "y"],
    [("t", 0), [("t", 1), ("t", 0)]],
    [],
], ids=["single", "list-of-keys-arg", "tuple-key", "list", "nested", "duplicates",
        "tuple-keys-nested", "empty"])
def test_get_legacy_graph_matches_dask_get(executor, keys):
    result = executor.get(LEGACY, keys)
    expected = dask.get(LEGACY, keys)
    assert to_lists(result) == to_lists(expected)


def test_get_graph_referring_to_existing_future(executor):
    f = executor.submit(inc, 10)
    assert f.result(timeout=30) == 11
    assert executor.get({"y": (inc, f.key)}, "y") == 12
    assert executor.get({"y": (add, f, 1)}, "y") == 12
    assert executor.get({"y": (add, f.key, "x"), "x": 5}, ["y", "x"]) == [16, 5]
    assert executor.get({"y": Task("y", inc, TaskRef(f.key))}, "y") == 12
    # the caller's future survives the computation that used it
    assert f.status == "finished"
    assert f.result(timeout=30) == 11


def test_get_missing_dependency_raises_value_error(executor):
    with pytest.raises(ValueError, match="nope"):
        executor.get({"y": Task("y", inc, TaskRef("nope"))}, "y")
    with pytest.raises(ValueError, match="nope"):
        executor.get({"y": Alias("y", "nope")}, "y")
    with pytest.raises(ValueError, match="nope"):
        executor.get({"y": (inc, 1)}, "nope")
    assert executor.get({"y": (inc, 1)}, "y") == 2


def test_get_computes_only_what_requested_keys_need(executor, tmp_path):
    marker = str(tmp_path / "bad-ran")
    dsk = {"x": 1, "y": (inc, "x"), "bad": (record_and_fail, marker), "worse": (inc, "bad")}
    assert executor.get(dsk, "y") == 2
    assert executor.get(dsk, ["x", ["y"]]) == [1, [2]]
    time.sleep(0.2)
    assert not os.path.exists(marker)
    # and the failing branch does fail, with its own type, when requested
    with pytest.raises(ZeroDivisionError):
        executor.get(dsk, "worse")
    assert os.path.exists(marker)


def test_get_task_error_type_and_exception_chain(executor):
    with pytest.raises(ZeroDivisionError) as info:
        executor.get({"a": (operator.truediv, 1, 0), "b": (inc, "a")}, "b")
    assert "division" in str(info.value)


# ---------------------------------------------------------------- a large graph
def rss_bytes(pid):
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sum_chunk(xs):
    return sum(xs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_100k_futures_then_tree_and_scheduler_forgets_them(executor):
    n = 100_000
    scheduler_state = executor.cluster.scheduler.state
    futures = executor.map(inc, range(n))
    level = futures
    while len(level) > 1:
        level = [executor.submit(_sum_chunk, level[i:i + 100]) for i in range(0, len(level), 100)]
    total = level[0]
    assert total.result(timeout=500) == n * (n + 1) // 2
    assert len(scheduler_state.tasks) >= n
    del futures, level, total
    gc.collect()
    poll(lambda: len(scheduler_state.tasks) == 0, timeout=60,
         msg="scheduler task table empty after release")
    poll(lambda: executor.scheduler_info()["tasks"] == 0, timeout=10, msg="tasks == 0")
    assert not executor.futures


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_100k_task_array_graph_on_cli_scheduler_and_memory_returns():
    """``da.ones(75000, chunks=1).sum()`` is ~100,000 tasks after
    optimisation; the scheduler holds them while the result's Future lives,
    forgets them after, and its RSS comes back near where it started."""
    with cluster(nworkers=2) as (addr, sched, workers):
        with Executor(addr, set_as_default=False) as e:
            start = rss_bytes(sched.pid)
            f = e.compute(da.ones(75_000, chunks=1).sum())
            assert f.result(timeout=800) == 75_000.0
            assert e.scheduler_info()["tasks"] >= 100_000
            del f
            gc.collect()
            poll(lambda: e.scheduler_info()["tasks"] == 0, timeout=60,
                 msg="scheduler task table empty after release")
            limit = start + 150 * 2**20
            try:
                poll(lambda: rss_bytes(sched.pid) < limit, timeout=15, interval=0.5)
            except AssertionError:
                pass
            end = rss_bytes(sched.pid)
            assert end < limit, ("scheduler RSS %.0f MB at start, %.0f MB after 100k tasks "
                                 "were released" % (start / 2**20, end / 2**20))


# ---------------------------------------------------------------- dataframe over CSV files
def _write_csv_shards(directory, nfiles=8, rows=880_000):
    rng = np.random.default_rng(2016)
    names = np.array(["alice", "bob", "charlie", "dan", "edith", "frank", "george", "hannah"])
    paths = []
    for i in range(nfiles):
        pdf = pd.DataFrame({
            "key": rng.integers(0, 1000, rows),
            "value": rng.standard_normal(rows),
            "name": names[rng.integers(0, len(names), rows)],
        })
        path = os.path.join(directory, "part-%02d.csv" % i)
        pdf.to_csv(path, index=False)
        paths.append(path)
    return paths


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_groupby_over_200mb_of_csv_matches_pandas(executor, tmp_path):
    paths = _write_csv_shards(str(tmp_path))
    try:
        assert sum(os.path.getsize(p) for p in paths) > 190 * 2**20
        ddf = dd.read_csv(os.path.join(str(tmp_path), "part-*.csv"))
        assert ddf.npartitions >= len(paths)
        agg = ddf.groupby("key").agg({"value": "sum", "name": "count"})
        mean = ddf.groupby("key").value.mean()
        top = ddf[ddf.name == "alice"].value.max()
        got_agg, got_mean, got_top = dask.compute(agg, mean, top, scheduler=executor)

        pdf = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
        exp_agg = pdf.groupby("key").agg({"value": "sum", "name": "count"})
        exp_mean = pdf.groupby("key").value.mean()
        exp_top = pdf[pdf.name == "alice"].value.max()
        assert len(exp_agg) == 1000
        pd.testing.assert_frame_equal(got_agg.sort_index(), exp_agg, check_exact=False,
                                      rtol=1e-9)
        pd.testing.assert_series_equal(got_mean.sort_index(), exp_mean, check_exact=False,
                                       rtol=1e-9)
        assert got_top == exp_top
        assert got_agg["name"].sum() == len(pdf)
    finally:
        shutil.rmtree(str(tmp_path), ignore_errors=True)


# ---------------------------------------------------------------- visualize
def _graphviz_available():
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return False
    return shutil.which("dot") is not None


def test_dask_visualize_without_graphviz_raises_clear_error_or_draws(tmp_path):
    x = _array().sum()
    filename = str(tmp_path / "graph.png")
    if _graphviz_available():
        dask.base.visualize(x, filename=filename)
        assert os.path.getsize(filename) > 0
    else:
        with pytest.raises((ImportError, RuntimeError), match="graphviz"):
            dask.base.visualize(x, filename=filename)


def test_executor_visualize_without_graphviz_raises_clear_error_or_draws(executor, tmp_path):
    assert hasattr(executor, "visualize"), "Executor.visualize is missing"
    f = executor.compute(_array().sum())
    f.result(timeout=30)
    filename = str(tmp_path / "executor-graph")
    if _graphviz_available():
        executor.visualize(filename=filename, format="png")
        assert os.path.getsize(filename + ".png") > 0
    else:
        with pytest.raises((ImportError, RuntimeError), match="graphviz"):
            executor.visualize(filename=filename)
    del f
