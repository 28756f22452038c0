"""A pytest plugin that runs dask's own tests with their computations on one
real local cluster of ours.

Load it with ``-p plugin`` (this folder on ``PYTHONPATH``), as
``tests/test_dask_suite.py`` does.  For the whole session it starts one
``Executor(n_workers=2)`` (scheduler in this process, two worker processes)
and sends every dask computation there:

* the Executor is the default client and config ``scheduler``, so plain
  ``compute()``/``persist()`` call ``executor.get`` (or ``executor.persist``);
* the named local schedulers (``"sync"``, ``"threads"``, ``"processes"`` and
  their aliases in ``dask.base.named_schedulers``) and the module functions
  ``dask.get``, ``dask.local.get_sync``, ``dask.threaded.get`` and
  ``dask.multiprocessing.get`` are replaced by a function that calls
  ``executor.get``.  The replacement happens before collection, so test
  modules that ``from dask.threaded import get`` pick it up, and every module
  already imported that bound one of the originals is rebound too.

What is left local: ``scheduler=<concurrent.futures.Executor>`` (dask drives
such pools itself) and graphs that dask code runs with ``dask.core.get``.

Every graph computation that reaches the cluster increments a counter (in a
wrapper around ``executor.get`` and ``executor.persist``), and the session
ends by printing ``dask-suite: N graph computations routed to the cluster``:
the proof that routing works.  ``tests/test_dask_suite.py`` parses that line.
A second line counts what still ran on a local dask scheduler (every local
scheduler goes through ``dask.local.get_async``).

Tests that cannot pass on any cluster are listed in ``deselected.txt`` next
to this file (or the file named by ``--dask-suite-deselect``), one node id per
line, each with a ``# reason``; ``xfail:`` lines are run as strict xfails.
A line without a reason is an error: the list must justify itself, and an
entry that matches nothing in a collected module is reported as stale.
"""
from __future__ import annotations

import os
import sys
import threading
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
COUNTER_LINE = "dask-suite: %d graph computations routed to the cluster"
LOCAL_LINE = "dask-suite: %d graph computations ran on a local dask scheduler"

_state = {"executor": None, "routed": 0, "local": 0, "originals": {}}
_count_lock = threading.Lock()


def _count(what="routed"):
    with _count_lock:
        _state[what] += 1


def _counting_local(get_async):
    """Wrap ``dask.local.get_async``, through which every local scheduler
    runs, to count the computations that escaped the cluster."""
    def counted_get_async(*args, **kwargs):
        _count("local")
        return get_async(*args, **kwargs)

    return counted_get_async


def _routed(name):
    """A stand-in for one of dask's local ``get`` functions that runs the
    graph on the session's cluster.  Keywords meant for local schedulers
    (``num_workers``, ``pool``, ``callbacks``...) are ignored by
    ``executor.get``.  One distinct function per original, because dask
    compares them (``get_scheduler_lock`` checks ``== multiprocessing.get``)."""
    def get(dsk, keys, **kwargs):
        return _state["executor"].get(dsk, keys, **kwargs)

    get.__name__ = get.__qualname__ = "routed_" + name
    return get


routed_get_sync = _routed("get_sync")
routed_threaded_get = _routed("threaded_get")
routed_multiprocessing_get = _routed("multiprocessing_get")


def _counting(method):
    """Bind a counting wrapper around a bound Executor method to the same
    executor, so that dask still finds ``wrapper.__self__`` (dask's persist
    looks for ``schedule.__self__.persist``)."""
    def wrapper(self, *args, **kwargs):
        _count()
        return method(*args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return types.MethodType(wrapper, method.__self__)


def _load_lists(path):
    """``({node id: reason} to deselect, {node id: reason} to xfail)`` from a
    file of ``node-id  # reason`` lines; ``xfail: node-id  # reason`` lines
    are run as strict xfails instead of being left out."""
    deselect, xfail = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            nodeid, sep, reason = line.partition("#")
            nodeid = nodeid.strip()
            if not sep or not reason.strip():
                raise pytest.UsageError("%s:%d: %r has no '# reason'" % (path, n, nodeid))
            if nodeid.startswith("xfail:"):
                xfail[nodeid[len("xfail:"):].strip()] = reason.strip()
            else:
                deselect[nodeid] = reason.strip()
    return deselect, xfail


def _rebind_everywhere(replacements):
    """Replace module-level bindings of the original scheduler functions in
    every loaded module (``from dask.local import get_sync as get`` in
    ``dask/__init__`` and the like)."""
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not d or getattr(mod, "__name__", "").startswith(("distributed", "plugin")):
            continue
        for name, value in list(d.items()):
            for original, new in replacements:
                if value is original:
                    setattr(mod, name, new)


def pytest_addoption(parser):
    group = parser.getgroup("dask-suite")
    group.addoption("--dask-suite-deselect", default=os.path.join(HERE, "deselected.txt"),
                    help="file of node ids to leave out, each with a '# reason'")
    group.addoption("--dask-suite-workers", type=int, default=2,
                    help="worker processes in the session's local cluster")


def pytest_configure(config):
    import dask
    import dask.base
    import dask.local
    import dask.multiprocessing
    import dask.threaded

    from distributed import Executor

    config.addinivalue_line("markers", "slow: dask's marker")
    config.addinivalue_line("markers", "network: dask's marker")
    config.addinivalue_line("markers", "gpu: dask's marker")
    config._dask_suite_deselected, config._dask_suite_xfail = _load_lists(
        config.getoption("--dask-suite-deselect"))

    executor = Executor(n_workers=config.getoption("--dask-suite-workers"), timeout=30)
    # instance attributes shadow the methods: dask looks up ``client.get`` and
    # ``client.persist`` on the object it gets from ``get_client()``
    executor.get = _counting(executor.get)
    executor.persist = _counting(executor.persist)
    _state["executor"] = executor

    originals = {"dask.local.get_sync": dask.local.get_sync,
                 "dask.threaded.get": dask.threaded.get,
                 "dask.multiprocessing.get": dask.multiprocessing.get,
                 "dask.base.named_schedulers": dict(dask.base.named_schedulers)}
    _state["originals"] = originals
    replacements = [(dask.local.get_async, _counting_local(dask.local.get_async)),
                    (originals["dask.local.get_sync"], routed_get_sync),
                    (originals["dask.threaded.get"], routed_threaded_get),
                    (originals["dask.multiprocessing.get"], routed_multiprocessing_get)]
    _rebind_everywhere(replacements)
    for name, get in dask.base.named_schedulers.items():
        for original, new in replacements:
            if get is original:
                dask.base.named_schedulers[name] = new
    # config ``scheduler`` wins over the default-client path and over the
    # collections' own ``__dask_scheduler__`` (bound at import, unpatchable)
    _state["config"] = dask.config.set(scheduler=executor)


@pytest.hookimpl(tryfirst=True)  # before -k/-m, so every list entry is checked
def pytest_collection_modifyitems(session, config, items):
    wanted = config._dask_suite_deselected
    xfail = config._dask_suite_xfail
    keep, drop = [], []
    for item in items:
        (drop if item.nodeid in wanted else keep).append(item)
        if item.nodeid in xfail:
            item.add_marker(pytest.mark.xfail(reason=xfail[item.nodeid], strict=True))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # an entry for a collected module that matches no test is a stale entry
    seen = {item.nodeid for item in items} | {item.nodeid for item in drop}
    modules = {nodeid.split("::")[0] for nodeid in seen}
    config._dask_suite_unmatched = sorted(
        n for n in (set(wanted) | set(xfail)) - seen if n.split("::")[0] in modules)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    unmatched = getattr(config, "_dask_suite_unmatched", [])
    if unmatched:
        terminalreporter.write_line("dask-suite: deselect entries matching no collected test:")
        for nodeid in unmatched:
            terminalreporter.write_line("    " + nodeid)
    terminalreporter.write_line(COUNTER_LINE % _state["routed"])
    terminalreporter.write_line(LOCAL_LINE % _state["local"])


def pytest_unconfigure(config):
    executor = _state.get("executor")
    if executor is None:
        return
    import dask.base

    dask.base.named_schedulers.update(_state["originals"]["dask.base.named_schedulers"])
    _state["config"].__exit__(None, None, None)
    _state["executor"] = None
    executor.close(timeout=30)
