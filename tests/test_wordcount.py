"""System tests for examples/wordcount.py: the distributed count must equal a
plain single-process count over the same files, with the same definition of
a word.  These start real worker processes, so most are marked slow."""
from __future__ import annotations

import doctest
import os
import subprocess
import sys
from collections import Counter

import pytest

from distributed import Executor
from distributed.utils_test import poll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPT = os.path.join(EXAMPLES, "wordcount.py")

sys.path.insert(0, EXAMPLES)
import wordcount  # noqa: E402


def serial_count(paths):
    """The reference: one process, no distributed code at all."""
    counts = Counter()
    for path in paths:
        with open(path, "rb") as f:
            counts.update(wordcount.WORD.findall(f.read().decode("utf-8", errors="replace")))
    return counts


@pytest.fixture(scope="module")
def files():
    return wordcount.list_files()


@pytest.fixture(scope="module")
def executor():
    """A local cluster of two single-thread worker processes.  The workers
    unpickle ``wordcount.count_words`` by reference, so they must be able to
    import ``wordcount``: put examples/ on their PYTHONPATH."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [p for p in [EXAMPLES, os.environ.get("PYTHONPATH", "")] if p]))
        with Executor(n_workers=2, threads_per_worker=1, set_as_default=False) as e:
            yield e


def test_module_doctests():
    failures, tried = doctest.testmod(wordcount)
    assert tried >= 3 and failures == 0


def test_list_files_is_stdlib_python_without_site_packages(files):
    assert len(files) > 500
    assert len(set(files)) == len(files)
    assert all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split(os.sep)}
    assert "site-packages" not in parts and "dist-packages" not in parts
    assert any(f.endswith(os.sep + "os.py") for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [7, 50])
def test_distributed_count_equals_serial_count_on_200_files(executor, files, batch_size):
    subset = files[:: max(1, len(files) // 200)][:200]
    assert len(subset) == 200
    # 200 / 7 gives 29 batches: an odd number, so the merge tree carries one over
    assert wordcount.run(executor, subset, batch_size=batch_size) == serial_count(subset)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_distributed_count_equals_serial_count_on_all_files(executor, files):
    result = wordcount.run(executor, files)
    expected = serial_count(files)
    assert result == expected
    assert result.most_common(1)[0][0] == expected.most_common(1)[0][0]


@pytest.mark.slow
def test_run_on_no_files_is_empty(executor):
    assert wordcount.run(executor, []) == Counter()


@pytest.mark.slow
def test_run_leaves_nothing_held_on_the_cluster(executor, files):
    wordcount.run(executor, files[:40], batch_size=5)
    # the futures died with run(): the executor and the scheduler forget them
    poll(lambda: not executor.futures, timeout=10, msg="executor released its futures")
    scheduler = executor.cluster.scheduler
    poll(lambda: not scheduler.state.tasks, timeout=10, msg="scheduler forgot the tasks")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_example_script_prints_top_words(tmp_path):
    # from another directory: the script must not depend on the cwd
    proc = subprocess.run([sys.executable, SCRIPT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "top 20 words:" in lines
    ranked = lines[lines.index("top 20 words:") + 1:][:20]
    assert [int(line.split()[0]) for line in ranked] == list(range(1, 21))
    assert "self" in {line.split()[1] for line in ranked}
    assert any(line.startswith("time: ") for line in lines)
