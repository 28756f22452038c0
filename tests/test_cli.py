"""Smoke tests of the ``dask-scheduler`` and ``dask-worker`` commands, run as
real processes (``python -m distributed.cli.dask_*``)."""
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import psutil
import pytest

from distributed import Executor
from distributed.utils_test import free_port, inc, kill_group, poll

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SCHEDULER = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


def popen(cmd):
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def read_until(proc, pattern, timeout=30):
    """Read the process's stderr until ``pattern`` matches; returns the match.
    Fails if the process exits or ``timeout`` passes first."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    text = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            m = re.search(pattern, text.decode(errors="replace"))
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("%r not printed within %s s; got:\n%s"
                                     % (pattern, timeout, text.decode(errors="replace")))
            if sel.select(left):
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    raise AssertionError("process exited (rc=%s) before printing %r:\n%s"
                                         % (proc.wait(5), pattern, text.decode(errors="replace")))
                text += chunk
    finally:
        sel.close()


def start_scheduler(*extra):
    proc = popen([*SCHEDULER, "--port", "0", *extra])
    addr = read_until(proc, r"Scheduler at: (tcp://[\d.]+:\d+)").group(1)
    return proc, addr


def start_worker(addr, *extra):
    return popen([*WORKER, addr, *extra])


def stop(*procs):
    for p in procs:
        kill_group(p)
        if p.stdout is not None:
            p.stdout.close()


# ---------------------------------------------------------------- --help
def test_scheduler_help_exits_zero_and_lists_options():
    out = subprocess.run([*SCHEDULER, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for opt in ("--host", "--port", "--heartbeat-timeout", "--allowed-failures", "--log-level"):
        assert opt in out.stdout
    assert "dask-scheduler" in out.stdout


def test_worker_help_exits_zero_and_lists_options():
    out = subprocess.run([*WORKER, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for opt in ("scheduler", "--nthreads", "--name", "--no-nanny", "--connect-timeout",
                "--memory-limit", "--port"):
        assert opt in out.stdout
    assert "--parent-nanny" not in out.stdout      # internal
    assert "dask-worker" in out.stdout


# ---------------------------------------------------------------- start and stop
def test_scheduler_prints_a_working_address_on_start():
    proc, addr = start_scheduler()
    try:
        assert not addr.endswith(":0")
        with Executor(addr, set_as_default=False, timeout=5) as e:
            assert e.scheduler_info()["address"] == addr
            assert e.ncores() == {}
    finally:
        stop(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_scheduler_stops_cleanly_on_signal(sig):
    proc, addr = start_scheduler()
    try:
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
    finally:
        stop(proc)


@pytest.mark.parametrize("nanny", [True, False])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_stops_cleanly_on_signal(sig, nanny):
    sched, addr = start_scheduler()
    worker = None
    try:
        worker = start_worker(addr, "--nthreads", "1", *([] if nanny else ["--no-nanny"]))
        read_until(worker, r"(?i)worker at: tcp://")
        with Executor(addr, set_as_default=False, timeout=5) as e:
            poll(lambda: len(e.ncores()) == 1, timeout=20)
            assert e.submit(inc, 1).result(timeout=10) == 2
            children = psutil.Process(worker.pid).children()
            assert len(children) == (1 if nanny else 0)
            worker.send_signal(sig)
            assert worker.wait(timeout=10) == 0
            poll(lambda: not e.ncores(), timeout=10, msg="worker left the scheduler")
        for c in children:
            poll(lambda: not c.is_running() or c.status() == psutil.STATUS_ZOMBIE, timeout=5)
        sched.send_signal(signal.SIGTERM)
        assert sched.wait(timeout=10) == 0
    finally:
        stop(*[p for p in (worker, sched) if p is not None])


@pytest.mark.parametrize("nanny", [True, False])
def test_worker_stops_cleanly_on_sigterm_right_after_announcing_itself(nanny):
    # a supervisor may signal as soon as the address is printed
    sched, addr = start_scheduler()
    worker = None
    try:
        worker = start_worker(addr, "--nthreads", "1", *([] if nanny else ["--no-nanny"]))
        read_until(worker, r"(?i)worker at: tcp://")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
    finally:
        stop(*[p for p in (worker, sched) if p is not None])


@pytest.mark.parametrize("nanny", [True, False])
def test_worker_without_scheduler_exits_nonzero_with_message(nanny):
    port = free_port()
    addr = "tcp://127.0.0.1:%d" % port
    start = time.monotonic()
    proc = start_worker(addr, "--connect-timeout", "2", *([] if nanny else ["--no-nanny"]))
    try:
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - start
        assert proc.returncode not in (0, None)
        assert elapsed < 10
        err = err.decode()
        assert "127.0.0.1:%d" % port in err
        assert re.search(r"(?i)could not|cannot|failed", err)
        assert "Traceback" not in err
    finally:
        stop(proc)


def test_worker_with_malformed_address_exits_with_usage_error():
    out = subprocess.run([*WORKER, "not an address:xyz"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "dask-worker:" in out.stderr


# ---------------------------------------------------------------- registration
def test_workers_register_with_their_nthreads():
    sched, addr = start_scheduler()
    workers = []
    try:
        workers = [start_worker(addr, "--nthreads", "1"),
                   start_worker(addr, "--nthreads", "3", "--no-nanny")]
        with Executor(addr, set_as_default=False, timeout=5) as e:
            poll(lambda: len(e.ncores()) == 2, timeout=30, msg="two workers registered")
            assert sorted(e.ncores().values()) == [1, 3]
            info = e.scheduler_info()["workers"]
            assert sorted(w["nthreads"] for w in info.values()) == [1, 3]
            assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
    finally:
        stop(*workers, sched)


@pytest.mark.parametrize("nanny", [True, False])
def test_worker_name_shows_in_scheduler_info(nanny):
    sched, addr = start_scheduler()
    worker = None
    try:
        worker = start_worker(addr, "--nthreads", "2", "--name", "alice",
                              *([] if nanny else ["--no-nanny"]))
        with Executor(addr, set_as_default=False, timeout=5) as e:
            poll(lambda: len(e.ncores()) == 1, timeout=30)
            [(waddr, info)] = e.scheduler_info()["workers"].items()
            assert info["name"] == "alice"
            assert info["nthreads"] == 2
            assert bool(info["nanny"]) is nanny
            # the name works as a worker restriction
            f = e.submit(inc, 1, workers=["alice"])
            assert f.result(timeout=10) == 2
            assert e.who_has([f])[f.key] == [waddr]
    finally:
        stop(*[p for p in (worker, sched) if p is not None])
