"""dask's own tests, with their computations on a real cluster of ours.

One pytest subprocess loads ``tests/dask_suite/plugin.py``, which starts one
local cluster (``Executor(n_workers=2)``) for the session and routes dask's
default, ``"sync"``, ``"threads"`` and ``"processes"`` schedulers to
``executor.get``.  The tests run from the installed dask package, so worker
processes import dask's test modules by reference from the same venv.

Tests that cannot pass on any cluster (object identity, monkeypatching,
warnings raised inside tasks, local-only defaults) are listed with their
reasons in ``tests/dask_suite/deselected.txt``.

Selection, chosen to finish in about six minutes on a busy two-core machine:

* ``dask/tests/test_delayed.py``, ``dask/bag/tests/test_bag.py``: all;
* ``dask/array/tests/test_reductions.py``: all, except that two combinatorial
  families are thinned (``test_chunk_structure_independence`` keeps the first
  of its six chunk layouts, ``test_quantile_weights_non_last_axis`` keeps the
  scalar ``q``).  Measured on the cluster: those two families took 190 of the
  module's 430 s and exercise no other scheduler path;
* ``dask/dataframe/tests/test_groupby.py``: the ``sum``/``mean``/``agg``
  tests, without their large parametrized families (142 of 2234 tests).
"""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "dask_suite")

GROUPBY_SLICE = ("(sum or mean or agg) and not aggregations_multilevel"
                 " and not categorical_observed and not hash_groupby_aggregate"
                 " and not single_element_groups and not multilevel_getitem"
                 " and not column_and_index and not sort_argument and not cumulative")
KEYWORDS = ("(test_delayed.py or test_bag.py or test_reductions.py"
            " or (test_groupby.py and (%s)))"
            " and not (test_chunk_structure_independence and not chunks0)"
            " and not (test_quantile_weights_non_last_axis and q1)" % GROUPBY_SLICE)
MODULES = ["dask/tests/test_delayed.py", "dask/bag/tests/test_bag.py",
           "dask/array/tests/test_reductions.py", "dask/dataframe/tests/test_groupby.py"]


def dask_suite_command(site_packages, modules=MODULES, keywords=KEYWORDS):
    """The pytest command line that runs ``modules`` on one cluster."""
    return [sys.executable, "-m", "pytest", "-p", "plugin", "-p", "no:cacheprovider",
            "--rootdir", site_packages, "-o", "timeout=120", "-q", "-rfEX",
            "-W", "ignore::pytest.PytestUnknownMarkWarning",
            "-k", keywords] + [os.path.join(site_packages, m) for m in modules]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dask_suite_passes_on_our_cluster():
    import dask

    site_packages = os.path.dirname(os.path.dirname(os.path.abspath(dask.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [SUITE, env.get("PYTHONPATH")] if p)
    proc = subprocess.run(dask_suite_command(site_packages), env=env, cwd=os.path.dirname(HERE),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=870)
    out = proc.stdout
    print(out[-20000:])  # shown by pytest when the test fails

    routed = re.search(r"dask-suite: (\d+) graph computations routed to the cluster", out)
    assert routed, "the plugin did not report its counter"
    assert "deselect entries matching no collected test" not in out
    assert proc.returncode == 0, "dask's tests failed on our cluster (output above)"
    assert int(routed.group(1)) > 100
