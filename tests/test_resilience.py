"""Resilience tests: real processes, real signals, real sockets, no mocks.

Each test starts its own ``dask-scheduler`` and ``dask-worker`` processes
(:class:`ProcCluster`), whose logs go to files under ``tmp_path`` (a pipe
nobody reads would block a chatty process once 64 KB are buffered, and the
files tell what happened when a test fails).  Workers run under their nanny
unless a test says otherwise; the worker process is found as the nanny's
child with psutil.

Worker processes cannot import this module (``tests/`` is not on their
path), so its task functions are pickled by value.
"""
import contextlib
import logging
import os
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import cloudpickle
import msgpack
import psutil
import pytest

from distributed import CancelledError, Executor, KilledWorker, as_completed
from distributed.utils_test import free_port, inc, gone, kill_group, pid_of_address, poll, slowinc

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- task functions
def logged_slowinc(x, path, delay=0.2):
    """``x + 1`` after ``delay`` s; appends ``x`` to ``path`` on every run."""
    with open(path, "a") as f:
        f.write("%d\n" % x)
    time.sleep(delay)
    return x + 1


def total(xs):
    return sum(xs)


def add(x, y):
    return x + y


def die_logged(path):
    """Kill the worker process running this task, every time."""
    with open(path, "a") as f:
        f.write("%d\n" % os.getpid())
    os._exit(1)


def sleep_logged(path, delay):
    """Note that it started, then sleep ``delay`` s."""
    with open(path, "a") as f:
        f.write("started\n")
    time.sleep(delay)
    return delay


def make_bytes(i, n):
    """``n`` bytes: more than a worker sends along with ``task-finished``,
    so that the executor fetches them from the worker."""
    return bytes([i % 256]) * n


def chaos_leaf(i):
    time.sleep(0.005)
    return i * i


# ---------------------------------------------------------------- processes
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProcCluster:
    """``dask-scheduler`` and ``dask-worker`` processes on free ports, logging
    to files in ``logdir``.  ``stop()`` kills every process group it started."""

    def __init__(self, logdir, nworkers=2, nthreads=1, nanny=True, scheduler_args=(),
                 worker_args=()):
        self.logdir = str(logdir)
        self.nthreads = nthreads
        self.nanny = nanny
        self.scheduler_args = list(scheduler_args)
        self.worker_args = list(worker_args)
        self.port = free_port()
        self.address = "tcp://127.0.0.1:%d" % self.port
        self.scheduler = None
        self.workers = []
        self._files = []
        self.start_scheduler()
        for _ in range(nworkers):
            self.start_worker()

    def _popen(self, cmd, name):
        f = open(os.path.join(self.logdir, name), "ab")
        self._files.append(f)
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=_env(),
                                start_new_session=True)

    def start_scheduler(self):
        cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", str(self.port),
               *self.scheduler_args]
        self.scheduler = self._popen(cmd, "scheduler.log")
        deadline = time.monotonic() + 30
        while True:
            if self.scheduler.poll() is not None:
                raise RuntimeError("scheduler exited: %s" % self.log("scheduler.log"))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self.scheduler
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def start_worker(self):
        cmd = [sys.executable, "-m", "distributed.cli.dask_worker", self.address,
               "--nthreads", str(self.nthreads), *self.worker_args]
        if not self.nanny:
            cmd.append("--no-nanny")
        p = self._popen(cmd, "worker-%d.log" % len(self.workers))
        self.workers.append(p)
        return p

    def worker_pids(self):
        """Pids of the worker processes (the nannies' children, or the
        processes themselves without nannies)."""
        if not self.nanny:
            return [p.pid for p in self.workers if p.poll() is None]
        pids = []
        for p in self.workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids.extend(c.pid for c in psutil.Process(p.pid).children())
        return pids

    def pid_of_address(self):
        """Worker address -> pid, from the port each worker process listens on."""
        return pid_of_address(self.worker_pids())

    def log(self, name):
        with open(os.path.join(self.logdir, name), errors="replace") as f:
            return f.read()

    def logs(self):
        return "\n".join("==== %s\n%s" % (n, self.log(n)[-4000:])
                         for n in sorted(os.listdir(self.logdir)) if n.endswith(".log"))

    def stop(self):
        for p in self.workers:
            kill_group(p)
        if self.scheduler is not None:
            kill_group(self.scheduler)
        for f in self._files:
            f.close()


@contextlib.contextmanager
def proc_cluster(logdir, nworkers=2, **kwargs):
    """A :class:`ProcCluster` and an Executor on it, once ``nworkers`` have
    registered.  Yields ``(executor, cluster)``."""
    c = ProcCluster(logdir, nworkers=nworkers, **kwargs)
    try:
        with Executor(c.address, set_as_default=False, timeout=10) as e:
            poll(lambda: len(e.ncores()) == nworkers, timeout=60, interval=0.05,
                 msg="%d workers registered" % nworkers)
            yield e, c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def who_has_keys(e, keys):
    # Executor.who_has takes futures; ask the scheduler for plain keys
    return e._sync(lambda: e.pool.rpc(e.address).who_has(keys=list(keys)))


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


# ---------------------------------------------------------------- 1. SIGKILL
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkilled_worker_tasks_are_rescheduled_and_lost_results_recomputed(tmp_path):
    runs = str(tmp_path / "runs.txt")
    with proc_cluster(tmp_path, nworkers=2) as (e, c):
        futures = e.map(logged_slowinc, range(16), path=runs, delay=0.25)
        s = e.submit(total, futures)
        keys = [f.key for f in futures]
        pids = c.pid_of_address()
        assert len(pids) == 2

        def victim_with_data_and_work():
            has, proc = e.has_what(), e.processing()
            for w in has:
                if set(has[w]) & set(keys) and proc.get(w):
                    return w
            return None

        poll(lambda: victim_with_data_and_work() is not None, timeout=30,
             msg="a worker holds a result and runs a task")
        victim = victim_with_data_and_work()
        held = set(e.has_what()[victim]) & set(keys)
        running = set(e.processing()[victim]) & set(keys)
        lost = held | running
        os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        poll(lambda: all(h and victim not in h for h in who_has_keys(e, lost).values()),
             timeout=30, interval=0.02, msg="the dead worker's keys in memory elsewhere")
        elapsed = time.monotonic() - t0
        print("\nSIGKILL -> %d lost/running keys (%d held, %d assigned) in memory elsewhere: "
              "%.2f s" % (len(lost), len(held), len(running), elapsed))
        assert victim not in e.ncores()
        assert e.gather(futures, timeout=60) == list(range(1, 17))
        assert s.result(timeout=30) == sum(range(1, 17))
        # the results it held were computed again, not served from nowhere
        with open(runs) as f:
            counts = {}
            for line in f:
                counts[int(line)] = counts.get(int(line), 0) + 1
        held_inputs = [i for i, k in enumerate(keys) if k in held]
        assert held_inputs
        assert all(counts[i] >= 2 for i in held_inputs), (held_inputs, counts)
        assert sorted(counts) == list(range(16))
        assert elapsed < 15


# ---------------------------------------------------------------- 2. SIGSTOP
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hung_worker_is_removed_after_heartbeat_timeout_and_its_tasks_finish_elsewhere(tmp_path):
    runs = str(tmp_path / "runs.txt")
    with proc_cluster(tmp_path, nworkers=2,
                      scheduler_args=["--heartbeat-timeout", "3"]) as (e, c):
        futures = e.map(logged_slowinc, range(12), path=runs, delay=0.5)
        s = e.submit(total, futures)
        keys = [f.key for f in futures]
        pids = c.pid_of_address()

        def victim_with_work():
            proc = e.processing()
            has = e.has_what()
            for w, ks in proc.items():
                if ks and set(has.get(w, ())) & set(keys):
                    return w
            return None

        poll(lambda: victim_with_work() is not None, timeout=30, msg="a worker with work")
        victim = victim_with_work()
        pid = pids[victim]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            lost = (set(e.has_what()[victim]) | set(e.processing()[victim])) & set(keys)
            assert lost
            poll(lambda: victim not in e.ncores(), timeout=10, interval=0.05,
                 msg="hung worker removed")
            detected = time.monotonic() - t0
            poll(lambda: all(h and victim not in h for h in who_has_keys(e, lost).values()),
                 timeout=max(0.1, 10 - (time.monotonic() - t0)), interval=0.05,
                 msg="the hung worker's %d keys in memory elsewhere within 10 s" % len(lost))
            finished = time.monotonic() - t0
            print("\nSIGSTOP -> hung worker removed after %.2f s; its %d keys finished "
                  "elsewhere after %.2f s" % (detected, len(lost), finished))
            assert 2.5 < detected < 6.5
            assert e.gather(futures, timeout=30) == list(range(1, 13))
            assert s.result(timeout=30) == sum(range(1, 13))
        finally:
            os.kill(pid, signal.SIGCONT)
        # the resumed worker comes back and is useful again; its stale
        # reports are ignored
        poll(lambda: victim in e.ncores(), timeout=20, msg="resumed worker re-registered")
        assert len(e.ncores()) == 2
        assert e.gather(futures, timeout=30) == list(range(1, 13))
        more = e.map(inc, range(100, 120))
        assert e.gather(more, timeout=30) == list(range(101, 121))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gather_from_a_hung_worker_returns_once_its_data_is_recomputed(tmp_path):
    # the executor is fetching from the worker when it hangs: the fetch must
    # not outlive the scheduler's verdict that the worker is gone
    with proc_cluster(tmp_path, nworkers=2,
                      scheduler_args=["--heartbeat-timeout", "3"]) as (e, c):
        futures = e.map(make_bytes, range(6), n=100_000)
        poll(lambda: all(f.done() for f in futures), timeout=30)
        who = e.who_has(futures)
        victim = who[futures[0].key][0]
        pid = c.pid_of_address()[victim]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            try:
                values = e.gather(futures, timeout=15)
            finally:
                print("\ngather started when a worker hung: returned after %.2f s"
                      % (time.monotonic() - t0))
            assert values == [bytes([i]) * 100_000 for i in range(6)]
            assert time.monotonic() - t0 < 10
            assert victim not in e.ncores()
        finally:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_task_whose_dependency_is_on_a_hung_worker_finishes_elsewhere(tmp_path):
    # bob is fetching x from alice when she hangs; x is recomputed on carol,
    # and bob must fetch it from carol instead of waiting on alice forever
    with proc_cluster(tmp_path, nworkers=3,
                      scheduler_args=["--heartbeat-timeout", "3"]) as (e, c):
        alice, bob, carol = sorted(e.ncores())
        busy = e.submit(slowinc, 0, delay=1.0, workers=[carol])
        poll(lambda: e.processing().get(carol), timeout=10)
        x = e.submit(make_bytes, 7, 100_000, workers=[alice, carol])
        poll(lambda: x.done(), timeout=30)
        assert e.who_has([x])[x.key] == [alice]
        pid = c.pid_of_address()[alice]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            y = e.submit(len, x, workers=[bob])
            try:
                assert y.result(timeout=15) == 100_000
            finally:
                print("\ntask on bob needing data of hung alice: %s after %.2f s"
                      % (y.status, time.monotonic() - t0))
            # recomputed on carol (bob may hold the copy it fetched, too)
            holders = e.who_has([x])[x.key]
            assert carol in holders and alice not in holders
            assert busy.result(timeout=10) == 1
        finally:
            os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------- 3. KilledWorker
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_task_that_kills_its_worker_errs_with_killed_worker_naming_the_key(tmp_path):
    deaths = str(tmp_path / "deaths.txt")
    with proc_cluster(tmp_path, nworkers=2,
                      scheduler_args=["--allowed-failures", "1"]) as (e, c):
        f = e.submit(die_logged, deaths)
        with pytest.raises(KilledWorker) as info:
            f.result(timeout=60)
        assert f.key in str(info.value)
        assert f.status == "error"
        assert count_lines(deaths) == 2            # allowed_failures + 1 deaths
        # the nannies replaced both dead workers and the cluster runs new work
        poll(lambda: len(e.ncores()) == 2 and len(c.pid_of_address()) == 2, timeout=30,
             msg="two workers again")
        assert e.gather(e.map(inc, range(20)), timeout=30) == list(range(1, 21))
        assert e.submit(add, 20, 22).result(timeout=30) == 42
        assert count_lines(deaths) == 2            # the failed task is not retried


# ---------------------------------------------------------------- 4. nanny restart
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_nanny_restarts_a_dead_worker_with_a_new_process(tmp_path):
    with proc_cluster(tmp_path, nworkers=2) as (e, c):
        before = c.pid_of_address()
        assert len(before) == 2 and set(before) == set(e.ncores())
        nanny = psutil.Process(c.workers[0].pid)
        (old_pid,) = [ch.pid for ch in nanny.children()]
        old_addr = next(a for a, p in before.items() if p == old_pid)
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()

        def replaced():
            kids = [ch.pid for ch in nanny.children() if not gone(ch.pid)]
            if len(kids) != 1 or kids[0] == old_pid:
                return False
            addrs = [a for a, p in pid_of_address(kids).items()]
            return len(addrs) == 1 and addrs[0] in e.ncores() and len(e.ncores()) == 2

        poll(replaced, timeout=30, interval=0.05, msg="a new worker process registered")
        print("\nnanny restart: new worker registered %.2f s after SIGKILL"
              % (time.monotonic() - t0))
        (new_pid,) = [ch.pid for ch in nanny.children() if not gone(ch.pid)]
        (new_addr,) = pid_of_address([new_pid])
        assert new_pid != old_pid and gone(old_pid)
        assert nanny.is_running()
        assert old_addr not in e.ncores()
        assert sorted(e.ncores().values()) == [1, 1]
        assert e.submit(add, 1, 2, workers=[new_addr]).result(timeout=30) == 3


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_that_joins_a_busy_cluster_takes_a_share_of_the_queued_work(tmp_path):
    with proc_cluster(tmp_path, nworkers=1) as (e, c):
        (first,) = e.ncores()
        futures = e.map(slowinc, range(200), delay=0.05)
        poll(lambda: any(f.done() for f in futures), timeout=30, msg="work started")
        c.start_worker()
        poll(lambda: len(e.ncores()) == 2, timeout=30, msg="second worker registered")
        (second,) = set(e.ncores()) - {first}
        assert e.gather(futures, timeout=60) == list(range(1, 201))
        ran_there = [k for k, holders in e.who_has(futures).items() if second in holders]
        # the tasks were not all handed to the first worker up front
        assert len(ran_there) >= 20


# ---------------------------------------------------------------- 5. vanished client
CLIENT_SCRIPT = r"""
import sys, time
import numpy as np
from distributed import Executor, wait
e = Executor(sys.argv[1], set_as_default=False)
solo = e.submit(np.ones, 50_000_000 // 8, key="solo-big")
shared = e.submit(np.full, 20_000_000 // 8, 7.0, key="shared-big")
wait([solo, shared], timeout=60)
assert solo.status == shared.status == "finished"
print("ready", flush=True)
time.sleep(600)
"""


def read_line(proc, timeout):
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError("no output within %s s" % timeout)
        return proc.stdout.readline().decode()
    finally:
        sel.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_vanished_client_releases_its_keys_but_not_those_another_client_holds(tmp_path):
    import numpy as np

    with proc_cluster(tmp_path, nworkers=1) as (e, c):
        (waddr, wpid), = c.pid_of_address().items()
        worker = psutil.Process(wpid)
        base = worker.memory_info().rss
        client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, c.address],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  env=_env(), start_new_session=True)
        try:
            assert read_line(client, 60).strip() == "ready"
            assert set(e.has_what()[waddr]) == {"solo-big", "shared-big"}
            # a second client holds the shared key too
            mine = e.submit(np.full, 20_000_000 // 8, 7.0, key="shared-big")
            poll(lambda: mine.done(), timeout=10)
            held = worker.memory_info().rss
            assert held - base > 60_000_000
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
            t0 = time.monotonic()
            poll(lambda: "solo-big" not in e.has_what()[waddr], timeout=10,
                 msg="the vanished client's key released")
            print("\nclient SIGKILL -> its key released after %.2f s" % (time.monotonic() - t0))
            assert who_has_keys(e, ["solo-big"]) == {"solo-big": []}
            assert e.scheduler_info()["clients"] == 1
            poll(lambda: worker.memory_info().rss < held - 40_000_000, timeout=10,
                 msg="worker RSS dropped by 40 MB")
            # the shared key is still there, with the right value
            assert e.has_what()[waddr] == ["shared-big"]
            value = mine.result(timeout=30)
            assert value.shape == (20_000_000 // 8,) and float(value.sum()) == 7.0 * value.size
            del value
            del mine
            poll(lambda: not e.has_what()[waddr], timeout=10, msg="shared key released last")
        finally:
            kill_group(client)
            if client.stdout is not None:
                client.stdout.close()


# ---------------------------------------------------------------- memory limit
def hold_megabytes(n):
    """An array of ``n`` MB, every page touched."""
    import numpy as np

    return np.ones(n * 2**20 // 8)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_worker_over_its_memory_limit_pauses_then_is_restarted_by_its_nanny(tmp_path):
    limit = 500 * 10**6  # '500MB', as dask.utils.parse_bytes reads it
    with proc_cluster(tmp_path, nworkers=1, worker_args=["--memory-limit", "500MB"]) as (e, c):
        (waddr, wpid), = c.pid_of_address().items()
        base = psutil.Process(wpid).memory_info().rss
        # past 80% of the limit: the worker pauses and takes no new task
        big = e.submit(hold_megabytes, (int(0.86 * limit) - base) >> 20)
        poll(lambda: big.done(), timeout=30, msg="the big array made")
        poll(lambda: "pauses" in c.log("worker-0.log"), timeout=10, msg="pause logged")
        waiting = e.submit(inc, 1)
        time.sleep(1.0)
        assert waiting.status == "pending"
        # freeing the array lets it resume and run what waited
        del big
        assert waiting.result(timeout=30) == 2
        assert "resumes" in c.log("worker-0.log")
        # past 95%: the worker exits, its nanny starts a new one, and the task
        # that keeps doing it ends with KilledWorker instead of looping forever
        hog = e.submit(hold_megabytes, limit >> 20, pure=False)
        with pytest.raises(KilledWorker):
            hog.result(timeout=120)
        log = c.log("worker-0.log")
        assert "over 95% of its memory limit of 500 MB: exiting so that its nanny restarts it" \
            in log
        poll(lambda: len(e.ncores()) == 1, timeout=30, msg="a worker again")
        (new_addr, new_pid), = c.pid_of_address().items()
        assert new_pid != wpid
        assert e.submit(inc, 41).result(timeout=30) == 42


MANY_CLIENTS_SCRIPT = r"""
import sys
from distributed import Executor, wait
executors = [Executor(sys.argv[1], set_as_default=False) for _ in range(int(sys.argv[2]))]
held = []
for i, e in enumerate(executors):
    fs = e.map(pow, range(i * 50, i * 50 + 50), [2] * 50, pure=False)
    wait(fs, timeout=60)
    held.append(fs)
assert all(f.status == "finished" for fs in held for f in fs)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_hundred_clients_that_vanish_leave_nothing_held(tmp_path):
    with proc_cluster(tmp_path, nworkers=2) as (e, c):
        sched = psutil.Process(c.scheduler.pid)
        assert e.submit(inc, 1).result(timeout=30) == 2
        before = sched.memory_info().rss
        clients = subprocess.Popen([sys.executable, "-c", MANY_CLIENTS_SCRIPT, c.address, "100"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(),
                                   start_new_session=True)
        try:
            assert read_line(clients, 120).strip() == "ready"
            info = e.scheduler_info()
            assert info["clients"] == 101 and info["tasks"] >= 5000
            during = sched.memory_info().rss
            os.killpg(clients.pid, signal.SIGKILL)
            clients.wait(10)
            poll(lambda: e.scheduler_info()["clients"] == 1, timeout=30, msg="clients gone")
            poll(lambda: e.scheduler_info()["tasks"] == 0, timeout=30, msg="their keys released")
            poll(lambda: not any(e.has_what().values()), timeout=30, msg="worker data freed")
            after = sched.memory_info().rss
            print("\n100 clients: scheduler RSS %.1f MB before, %.1f MB with them, %.1f MB "
                  "after they vanished" % (before / 2**20, during / 2**20, after / 2**20))
            assert after - before < 30 * 2**20
            assert e.gather(e.map(inc, range(10)), timeout=30) == list(range(1, 11))
        finally:
            kill_group(clients)
            for f in (clients.stdin, clients.stdout):
                if f is not None:
                    f.close()


# ---------------------------------------------------------------- 6. scheduler restart
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_scheduler_restart_on_same_port_workers_and_executor_come_back(tmp_path):
    with proc_cluster(tmp_path, nworkers=2) as (e, c):
        done = e.submit(inc, 1)
        assert done.result(timeout=30) == 2
        running = e.submit(slowinc, 1, delay=3)
        poll(lambda: any(e.processing().values()), timeout=10)
        os.killpg(c.scheduler.pid, signal.SIGKILL)
        c.scheduler.wait(10)
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            running.result(timeout=15)
        waited = time.monotonic() - t0
        print("\nscheduler SIGKILL -> pending future raised %s after %.2f s"
              % (info.type.__name__, waited))
        assert not isinstance(info.value, TimeoutError)
        assert waited < 5
        assert "scheduler" in str(info.value)
        with pytest.raises(Exception):
            done.result(timeout=5)
        with pytest.raises(OSError):
            e.submit(inc, 2)        # disconnected: says so instead of queueing forever
        c.start_scheduler()
        t1 = time.monotonic()
        poll(lambda: e.status == "running", timeout=30, interval=0.05, msg="executor reconnected")
        poll(lambda: len(e.ncores()) == 2, timeout=60, interval=0.1, msg="workers re-registered")
        print("new scheduler -> executor and both workers back after %.2f s"
              % (time.monotonic() - t1))
        assert e.submit(inc, 10).result(timeout=30) == 11
        assert e.submit(inc, 1).result(timeout=30) == 2     # an old key, computed afresh
        assert e.gather(e.map(inc, range(20)), timeout=30) == list(range(1, 21))


# ---------------------------------------------------------------- 7. cancel, timeouts, close
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cancelling_a_long_running_task_frees_its_worker_for_new_work(tmp_path):
    started = str(tmp_path / "started.txt")
    with proc_cluster(tmp_path, nworkers=1, nthreads=1) as (e, c):
        long = e.submit(sleep_logged, started, 60)
        poll(lambda: count_lines(started) == 1, timeout=30, msg="long task started")
        long.cancel()
        assert long.cancelled()
        t0 = time.monotonic()
        poll(lambda: not any(e.processing().values()), timeout=5)
        quick = e.submit(inc, 41)
        try:
            assert quick.result(timeout=10) == 42
        finally:
            print("\nafter cancelling a running 60 s task, new work: %s after %.2f s"
                  % (quick.status, time.monotonic() - t0))
        assert e.gather(e.map(inc, range(10)), timeout=10) == list(range(1, 11))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_result_gather_and_as_completed_raise_builtin_timeout_error(tmp_path):
    with proc_cluster(tmp_path, nworkers=1, nthreads=1) as (e, c):
        f = e.submit(slowinc, 1, delay=4)
        g = e.submit(slowinc, 2, delay=0.1)

        def timed(func):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                func()
            assert info.type is TimeoutError
            return time.monotonic() - t0

        assert timed(lambda: f.result(timeout=0.3)) < 1.5
        assert timed(lambda: e.gather([f, g], timeout=0.3)) < 1.5
        assert timed(lambda: next(iter(as_completed([f], timeout=0.3)))) < 1.5
        assert f.status == "pending"
        # the work goes on, and patient callers get the values
        assert e.gather([f, g], timeout=30) == [2, 3]
        assert [x.result() for x in as_completed([f, g], timeout=30)] in ([2, 3], [3, 2])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_close_while_tasks_run_returns_quickly_and_leaves_no_worker_process():
    me = psutil.Process()
    e = Executor(n_workers=1, set_as_default=False)
    try:
        pids = [n.process.pid for n in e.cluster.nannies]
        assert all(p in [ch.pid for ch in me.children(recursive=True)] for p in pids)
        futures = e.map(slowinc, range(5), delay=30)
        poll(lambda: any(e.processing().values()), timeout=30)
    finally:
        t0 = time.monotonic()
        e.close()
        elapsed = time.monotonic() - t0
    print("\nclose() with tasks running took %.2f s" % elapsed)
    assert elapsed < 8
    assert e.status == "closed"
    assert all(f.cancelled() for f in futures)
    poll(lambda: all(gone(p) for p in pids), timeout=10, msg="worker processes gone")
    left = [ch for ch in me.children(recursive=True) if ch.pid in pids and not gone(ch.pid)]
    assert not left


# ---------------------------------------------------------------- 8. bad input
def frame(*payloads):
    """One message on the wire: frame count, frame lengths, frames."""
    return struct.pack("<%dQ" % (len(payloads) + 1), len(payloads),
                       *[len(p) for p in payloads]) + b"".join(payloads)


def packed(msg):
    return frame(msgpack.packb(msg, use_bin_type=True))


def send_and_wait_close(port, data, timeout=5.0):
    """Send ``data`` on a fresh connection; return everything the server
    wrote before it closed the connection.  Fails if it stays open."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise AssertionError("server kept the connection open after %r" % data[:60])
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got
            except socket.timeout:
                continue
            if not chunk:
                return got
            got += chunk


def decode_reply(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    lengths = struct.unpack("<%dQ" % n, raw[8:8 + 8 * n])
    return msgpack.unpackb(raw[8 + 8 * n: 8 + 8 * n + lengths[0]], raw=False)


#: (name, bytes, counted as a bad message by the server)
BAD_INPUTS = [
    ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
    ("0xff bytes", b"\xff" * 64, True),
    ("zero frames", struct.pack("<Q", 0), True),
    ("huge frame count", struct.pack("<Q", 2 ** 62), True),
    ("oversized length prefix", struct.pack("<QQ", 1, 2 ** 62) + b"x" * 16, True),
    ("undecodable header", frame(b"\xc1\xc1\xc1"), True),
    ("not a dict", packed([1, 2, 3]), True),
    ("dict without op", packed({"keys": ["x"]}), True),
    ("unknown op", packed({"op": "no-such-op", "x": 1}), True),
    ("unknown field", packed({"op": "identity", "bogus": 1}), True),
    ("missing field", packed({"op": "register-worker"}), True),
    ("wrong field type", packed({"op": "who-has", "keys": 5}), True),
]


def throw_bad_inputs(port):
    """Send every BAD_INPUT, a truncated frame and a stream with an unknown
    op; return how many the server should count."""
    counted = 0
    for name, data, bad in BAD_INPUTS:
        reply = send_and_wait_close(port, data)
        if reply:
            msg = decode_reply(reply)
            assert msg["status"] == "error", (name, msg)
        counted += bad
    # a truncated frame, then the sender goes away: just a closed connection
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("<QQ", 1, 100) + b"0123456789")
    return counted


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_garbage_on_scheduler_and_worker_ports_costs_only_those_connections(tmp_path):
    with proc_cluster(tmp_path, nworkers=1) as (e, c):
        (waddr,) = e.ncores()
        wport = int(waddr.rsplit(":", 1)[1])
        before = e.scheduler_info()["bad_messages"]
        silent = socket.create_connection(("127.0.0.1", c.port), timeout=5)
        silent_w = socket.create_connection(("127.0.0.1", wport), timeout=5)
        try:
            expected = throw_bad_inputs(c.port)
            # a client stream that sends an unknown op is dropped, and counted
            reply = send_and_wait_close(
                c.port, packed({"op": "register-client", "client": "intruder"})
                + packed([{"op": "no-such-stream-op"}]))
            assert decode_reply(reply)["status"] == "OK"
            expected += 1
            throw_bad_inputs(wport)
            # everything still works, while the silent connections stay open
            assert e.gather(e.map(inc, range(20)), timeout=30) == list(range(1, 21))
            x = e.submit(inc, 1)
            assert e.submit(add, x, x).result(timeout=30) == 4
            info = e.scheduler_info()
            assert info["bad_messages"] - before == expected
            assert info["clients"] == 1
            assert list(info["workers"]) == [waddr]
            assert c.scheduler.poll() is None
            assert len(c.pid_of_address()) == 1
        finally:
            silent.close()
            silent_w.close()
        # the scheduler's log says so, but not once per message
        log = c.log("scheduler.log")
        assert 0 < log.count("dropping connection") <= 5, log[-3000:]


# ---------------------------------------------------------------- 8b. fuzz
class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a result."""

    def __init__(self):
        import asyncio

        self.asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="fuzz-loop")
        self.thread.start()

    def run(self, coro, timeout=30):
        return self.asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def fuzz_strategies():
    """Lists of 1-3 inputs, each for its own connection (opened together, so
    a fake worker and a fake client can meet): raw bytes, one framed
    request, a registration followed by a batch of stream messages, or a
    framed message with bytes spliced in.  Message fields are well typed
    about half the time, so that the fuzz gets past argument checks into
    the state machine."""
    from hypothesis import strategies as st

    from distributed.protocol import dumps

    scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
               | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=8))
    junk = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 3), inner, max_size=3),
        max_leaves=8)
    key = st.sampled_from(["x", "y", "z", ("x", 0), ("x", 1)]) | st.text(max_size=3)
    keys = st.lists(key, max_size=4)
    addr = st.sampled_from(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]) | st.text(max_size=8)
    small = st.integers(-2, 10)

    def field(typed):
        return typed | junk

    spec = st.fixed_dictionaries({"function": st.binary(max_size=16)}) | junk
    typed = {
        "keys": keys, "key": key, "address": addr, "worker": addr, "client": st.text(max_size=4),
        "nthreads": small, "name": st.text(max_size=4) | st.none(), "nanny": addr | st.none(),
        "memory_limit": small, "run_id": small, "nbytes": small, "type": st.text(max_size=4),
        "tasks": st.dictionaries(key, spec, max_size=4),
        "dependencies": st.dictionaries(key, keys, max_size=4),
        "priority": st.dictionaries(key, small, max_size=3),
        "user_priority": small, "restrictions": st.dictionaries(key, st.lists(addr), max_size=2),
        "retries": st.dictionaries(key, small, max_size=2),
        "missing": st.dictionaries(key, st.lists(addr, max_size=2), max_size=2),
        "exception": junk, "traceback": st.text(max_size=8), "paused": st.booleans(),
        "id": small, "reply": st.booleans(), "timeout": small, "data": junk,
    }
    ops = {
        # one-off requests
        "who-has": ["keys"], "has-what": [], "ncores": [], "processing": [],
        "scheduler-info": [], "identity": [], "get-data": ["keys"],
        "register-worker": ["address", "nthreads", "name", "nanny", "memory_limit", "keys"],
        "register-client": ["client"],
        # stream messages
        "update-graph": ["tasks", "dependencies", "keys", "priority", "user_priority",
                         "restrictions", "retries"],
        "client-releases-keys": ["keys"], "client-desires-keys": ["keys"],
        "cancel-keys": ["keys"], "restart": ["id"], "heartbeat": [],
        "task-finished": ["key", "run_id", "nbytes", "type"],
        "task-erred": ["key", "run_id", "exception", "traceback"],
        "missing-data": ["key", "run_id", "missing"], "add-keys": ["keys"],
        "release-worker-data": ["keys"], "worker-paused": ["paused"],
        "unregister": [], "close-client": [],
    }
    stream_ops = list(ops)[9:]
    request_ops = list(ops)[:9]

    def message(names):
        def build(op):
            fields = ops.get(op, list(typed))
            return st.fixed_dictionaries(
                {}, optional={f: field(typed[f]) for f in fields + ["reply"]}
            ).map(lambda d: {"op": op, **d})

        return (st.sampled_from(names) | st.text(max_size=6)).flatmap(build) | junk

    def wire(msg):
        frames = dumps(msg)
        return frame(*frames)

    raw = st.binary(max_size=200)
    request = message(request_ops).map(wire)
    stream = st.tuples(
        st.sampled_from([{"op": "register-client", "client": "fuzz-client"},
                         {"op": "register-worker", "address": "tcp://127.0.0.1:1",
                          "nthreads": 1},
                         {"op": "register-worker", "address": "tcp://127.0.0.1:2",
                          "nthreads": 2, "keys": {"x": 8}}]),
        st.lists(message(stream_ops), min_size=1, max_size=4),
    ).map(lambda t: wire(t[0]) + wire(t[1]))
    garbled = st.tuples(request | stream, st.integers(0, 300),
                        st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])
    return st.lists(raw | request | stream | garbled, min_size=1, max_size=3)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fuzz_scheduler_with_random_bytes_and_messages(caplog):
    from hypothesis import HealthCheck, given, settings

    from distributed.scheduler import Scheduler
    from distributed.worker import Worker

    caplog.set_level(logging.WARNING, logger="distributed")
    budget = 90.0
    lt = LoopThread()

    async def start():
        s = Scheduler(port=0, validate=False, heartbeat_timeout=5)
        await s.start()
        w = Worker(s.address, nthreads=1)
        await w.start()
        return s, w

    s, w = lt.run(start())
    port = int(s.address.rsplit(":", 1)[1])
    thrown = {"inputs": 0, "examples": 0, "left open": 0}
    t0 = time.monotonic()
    try:
        @settings(max_examples=2000, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(fuzz_strategies())
        def throw(inputs):
            if time.monotonic() - t0 > budget:
                return
            socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in inputs]
            try:
                for sock, data in zip(socks, inputs):
                    with contextlib.suppress(OSError):
                        sock.sendall(data)
                    thrown["inputs"] += 1
                # our end of the conversation is over: the server must now
                # finish with what it was sent and close its end
                deadline = time.monotonic() + 2
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                for sock in socks:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        while sock.recv(65536):
                            pass
                    except socket.timeout:
                        thrown["left open"] += 1
                    except OSError:
                        pass
            finally:
                for sock in socks:
                    sock.close()
            thrown["examples"] += 1

        throw()
        fuzz_time = time.monotonic() - t0
        # the server has closed every fuzz connection and forgotten the fakes
        poll(lambda: len(s.comms) <= 3, timeout=20, msg="fuzz connections closed")
        poll(lambda: set(s.state.workers) == {w.address}, timeout=20,
             msg="only the real worker registered")
        with Executor(s.address, set_as_default=False, timeout=10) as e:
            assert e.gather(e.map(inc, range(50)), timeout=30) == list(range(1, 51))
            x = e.submit(inc, 1)
            assert e.submit(add, x, x).result(timeout=30) == 4

        async def check():
            s.state.validate_state()
            w.state.validate_state()
            return s.bad_messages

        bad = lt.run(check())
        records = [r for r in caplog.records if r.name.startswith("distributed")]
        print("\nfuzz: %d inputs in %d examples in %.1f s; %d counted as bad, %d connections "
              "left open; %d log records" % (thrown["inputs"], thrown["examples"], fuzz_time,
                                             bad, thrown["left open"], len(records)))
        assert thrown["inputs"] >= 1000
        assert bad > 100
        assert len(records) <= 30, "\n".join(
            "%s %s" % (r.levelname, r.getMessage()[:300]) for r in records[:40])
    finally:
        async def stop():
            await w.close()
            await s.close()

        lt.run(stop())
        lt.stop()


# ---------------------------------------------------------------- 9. chaos
def tree_sum(values):
    """The pairwise reduction the cluster does, done here."""
    level = list(values)
    while len(level) > 1:
        nxt = [add(a, b) for a, b in zip(level[0::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Killer(threading.Thread):
    """SIGKILL a random worker process (never a nanny) every ``interval`` s."""

    def __init__(self, cluster, interval=2.0, seed=0):
        super().__init__(daemon=True, name="chaos-killer")
        self.cluster = cluster
        self.interval = interval
        self.random = random.Random(seed)
        self.stopped = threading.Event()
        self.kills = []

    def run(self):
        while not self.stopped.wait(self.interval):
            pids = [p for p in self.cluster.worker_pids() if not gone(p)]
            if not pids:
                continue
            pid = self.random.choice(pids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.kills.append((time.monotonic(), pid))

    def stop(self):
        self.stopped.set()
        self.join(10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_tree_reduction_survives_a_worker_sigkill_every_two_seconds(tmp_path):
    n = 5000
    expected = tree_sum(chaos_leaf(i) for i in range(n))
    with proc_cluster(tmp_path, nworkers=3) as (e, c):
        killer = Killer(c, interval=2.0)
        t0 = time.monotonic()
        killer.start()
        root = None
        try:
            level = e.map(chaos_leaf, range(n))
            ntasks = len(level)
            while len(level) > 1:
                nxt = e.map(add, level[0::2], level[1::2])
                if len(level) % 2:
                    nxt.append(level[-1])
                ntasks += len(level) // 2
                level = nxt      # hold only the frontier: consumed data is freed
            (root,) = level
            del level, nxt
            result = root.result(timeout=120)
        finally:
            killer.stop()
            elapsed = time.monotonic() - t0
            print("\nchaos: %d tasks, %d worker SIGKILLs, %.1f s, root %s"
                  % (ntasks, len(killer.kills), elapsed, getattr(root, "status", None)))
        assert ntasks >= 9999
        assert result == expected
        assert len(killer.kills) >= 3
        # the cluster heals: three workers again, and it still computes
        poll(lambda: len(e.ncores()) == 3, timeout=60, msg="three workers again")
        assert e.gather(e.map(inc, range(30)), timeout=30) == list(range(1, 31))
