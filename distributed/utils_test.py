"""Helpers for tests: in-process clusters on one loop, real process clusters,
and polling with a timeout.

* :func:`gen_cluster`: decorator for ``async def test(e, s, a, b)``; a
  Scheduler and Workers run in this process on one event loop, over real TCP.
* :func:`cluster`: context manager that starts ``dask-scheduler`` and
  ``dask-worker`` as real subprocesses on free ports.
* :func:`poll` / :func:`apoll`: wait for a condition, with a timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time

from .executor import Executor
from .scheduler import Scheduler
from .worker import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inc(x):
    return x + 1


def dec(x):
    return x - 1


def add(x, y):
    return x + y


def slowinc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def throws(x):
    raise RuntimeError("hello!")


def poll(predicate, timeout=10.0, interval=0.01, msg="condition"):
    """Wait until ``predicate()`` is true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("%s not met within %s s" % (msg, timeout))
        time.sleep(interval)


async def apoll(predicate, timeout=10.0, interval=0.01, msg="condition"):
    """Coroutine form of :func:`poll`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("%s not met within %s s" % (msg, timeout))
        await asyncio.sleep(interval)


def gen_cluster(executor=False, nthreads=(1, 1), timeout=30, validate=True, **scheduler_kwargs):
    """Run ``async def test(s, a, b)`` (or ``test(e, s, a, b)`` with
    ``executor=True``) against a scheduler and ``len(nthreads)`` workers in
    this process, with invariant checks on.  Everything is closed after."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            async def run():
                s = Scheduler(port=0, validate=validate, **scheduler_kwargs)
                await s.start()
                workers = [Worker(s.address, nthreads=n, validate=validate) for n in nthreads]
                try:
                    await asyncio.gather(*[w.start() for w in workers])
                    e = None
                    if executor:
                        e = Executor(s.address, asynchronous=True, set_as_default=False)
                        await e._start()
                    try:
                        pre = [e] if executor else []
                        await asyncio.wait_for(func(*args, *pre, s, *workers, **kwargs), timeout)
                    finally:
                        if e is not None:
                            await e._close()
                finally:
                    await asyncio.gather(*[w.close() for w in workers], return_exceptions=True)
                    await s.close()

            asyncio.run(run())

        wrapper.__signature__ = None
        del wrapper.__wrapped__
        return wrapper

    return decorator


def _env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([p for p in [root, env.get("PYTHONPATH", "")] if p])
    return env


def start_scheduler(port=None, extra=()):
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    addr = "tcp://127.0.0.1:%d" % port
    _wait_port(port, proc)
    return proc, addr


def start_worker(address, nthreads=1, nanny=True, extra=()):
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", str(nthreads)]
    if not nanny:
        cmd.append("--no-nanny")
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(), start_new_session=True)


def _wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited early: %s" % proc.stderr.read().decode())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("port %d not open after %s s" % (port, timeout))


def kill_group(proc, timeout=5):
    """SIGTERM a process group, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if proc.stderr is not None:
        proc.stderr.close()


@contextlib.contextmanager
def cluster(nworkers=2, nthreads=1, nanny=True, scheduler_args=(), worker_args=()):
    """Real ``dask-scheduler`` and ``dask-worker`` processes on free ports.
    Yields ``(scheduler_address, scheduler_process, worker_processes)``;
    waits until all workers have registered."""
    sched, addr = start_scheduler(extra=scheduler_args)
    workers = []
    try:
        workers = [start_worker(addr, nthreads, nanny, worker_args) for _ in range(nworkers)]
        with Executor(addr, set_as_default=False) as e:
            poll(lambda: len(e.ncores()) >= nworkers, timeout=60, interval=0.05,
                 msg="%d workers registered" % nworkers)
        yield addr, sched, workers
    finally:
        for w in workers:
            kill_group(w)
        kill_group(sched)


def pid_of_address(pids):
    """Worker address -> pid, from the port each worker process listens on."""
    import psutil

    out = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                out["tcp://127.0.0.1:%d" % conn.laddr.port] = pid
    return out


def gone(pid):
    """Whether process ``pid`` has exited (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
