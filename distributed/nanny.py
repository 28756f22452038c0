"""A small supervisor that runs one worker in a child process.

The nanny starts ``python -m distributed.cli.dask_worker ... --no-nanny``
as a child, learns its address when the worker calls ``worker-ready``, and
starts a new one when the child dies unexpectedly.  The scheduler's
``restart`` asks each nanny to kill its worker (SIGKILL: a task stuck in C
code cannot delay it) and start a fresh one.  The child watches its parent
and exits if the nanny goes away, so no worker outlives its nanny.

State: ``process`` (the running child, or None), ``worker_address``,
``restarts`` (how many times it started a replacement).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from .comm import normalize_address
from .core import Server

logger = logging.getLogger(__name__)


class Nanny(Server):
    """Parameters as for :class:`~distributed.worker.Worker`, plus
    ``restart_on_death`` (start a new worker when the child dies)."""

    def __init__(self, scheduler_address, nthreads=1, host="127.0.0.1", port=0, name=None,
                 worker_port=0, memory_limit=0, restart_on_death=True, start_timeout=60.0,
                 connect_timeout=30.0, env=None, quiet=False, log_level="INFO"):
        handlers = {
            "restart": self.handle_restart,
            "terminate": self.handle_terminate,
            "worker-ready": self.handle_worker_ready,
        }
        super().__init__(handlers, name="nanny")
        self.scheduler_address = normalize_address(scheduler_address)
        self.nthreads = nthreads
        self.host = host
        self.port = port
        self.worker_name = name
        self.worker_port = worker_port
        self.memory_limit = memory_limit
        self.restart_on_death = restart_on_death
        self.start_timeout = start_timeout
        self.connect_timeout = connect_timeout
        self.env = env
        self.quiet = quiet
        self.log_level = log_level
        self.process = None
        self.worker_address = None
        self.restarts = 0
        self._ready = None
        self._lock = None
        self._tasks = set()

    def __repr__(self):
        return "<Nanny %s: worker %s>" % (self.address, self.worker_address)

    async def start(self):
        self._lock = asyncio.Lock()
        await self.listen("tcp://%s:%d" % (self.host, self.port))
        async with self._lock:
            await self._start_worker()
        return self

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_worker(self):
        self._ready = asyncio.Event()
        self.worker_address = None
        cmd = [sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler_address,
               "--no-nanny", "--nthreads", str(self.nthreads), "--host", self.host,
               "--port", str(self.worker_port), "--parent-nanny", self.address,
               "--connect-timeout", str(self.connect_timeout),
               "--memory-limit", str(self.memory_limit), "--log-level", self.log_level]
        if self.worker_name is not None:
            cmd += ["--name", str(self.worker_name)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Functions pickle by reference to their module, so the worker must
        # import whatever this process can: give it our sys.path.
        paths = dict.fromkeys(os.path.abspath(p or os.getcwd()) for p in sys.path)
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in [*paths, env.get("PYTHONPATH", "")] if p])
        devnull = asyncio.subprocess.DEVNULL if self.quiet else None
        process = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=devnull, stderr=devnull)
        self.process = process
        self._spawn(self._watch(process))
        waiter = asyncio.ensure_future(self._ready.wait())
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait([waiter, exited], timeout=self.start_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if waiter not in done:
            if exited not in done:
                self._kill(process)
            exited.cancel()
            raise RuntimeError("worker process did not start within %.0f s (exit code %s)"
                               % (self.start_timeout, process.returncode))
        exited.cancel()

    async def _watch(self, process):
        rc = await process.wait()
        if process is not self.process or self.status != "running":
            return
        self.process = None
        logger.warning("nanny %s: worker process %d exited with code %s", self.address,
                       process.pid, rc)
        if self.restart_on_death and not self._lock.locked():
            async with self._lock:
                if self.status == "running" and self.process is None:
                    self.restarts += 1
                    try:
                        await self._start_worker()
                    except RuntimeError as e:
                        logger.error("nanny %s: could not start a new worker: %s", self.address, e)

    def _kill(self, process, sig=signal.SIGKILL):
        if process is not None and process.returncode is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass

    async def handle_worker_ready(self, comm, address):
        self.worker_address = address
        if self._ready is not None:
            self._ready.set()
        return "OK"

    async def handle_restart(self, comm, timeout=30.0):
        """Kill the worker and start a fresh one; reply once it is registered."""
        async with self._lock:
            process, self.process = self.process, None
            if process is not None:
                self._kill(process)
                try:
                    await asyncio.wait_for(process.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            self.restarts += 1
            await self._start_worker()
        return "OK"

    async def handle_terminate(self, comm):
        self._spawn(self.close())
        return "OK"

    async def close(self, timeout=3.0):
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        self.stop_listening()
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            self._kill(process, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                self._kill(process)
                try:
                    await asyncio.wait_for(process.wait(), timeout)
                except asyncio.TimeoutError:
                    logger.error("nanny %s: worker process %d did not die", self.address, process.pid)
        for task in list(self._tasks):
            task.cancel()
        self.close_comms()
        self.status = "closed"
