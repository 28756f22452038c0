"""A cluster on this machine: a scheduler on the caller's loop and one
nanny-supervised worker process per core, all on 127.0.0.1.

``Executor()`` with no address makes one and closes it on ``close()``.
"""
from __future__ import annotations

import asyncio
import logging
import os

from .nanny import Nanny
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class LocalCluster:
    """Parameters: ``n_workers`` (default: one per core), ``threads_per_worker``,
    ``host``, ``scheduler_port`` (0: any free port)."""

    def __init__(self, n_workers=None, threads_per_worker=1, host="127.0.0.1", scheduler_port=0,
                 heartbeat_timeout=30.0, allowed_failures=3, quiet=False):
        self.n_workers = n_workers if n_workers is not None else (os.cpu_count() or 1)
        self.threads_per_worker = threads_per_worker
        self.host = host
        self.scheduler_port = scheduler_port
        self.heartbeat_timeout = heartbeat_timeout
        self.allowed_failures = allowed_failures
        self.quiet = quiet
        self.scheduler = None
        self.nannies = []

    @property
    def scheduler_address(self):
        return self.scheduler.address

    async def _start(self):
        self.scheduler = Scheduler(host=self.host, port=self.scheduler_port,
                                   heartbeat_timeout=self.heartbeat_timeout,
                                   allowed_failures=self.allowed_failures)
        await self.scheduler.start()
        self.nannies = [Nanny(self.scheduler.address, nthreads=self.threads_per_worker,
                              host=self.host, quiet=self.quiet, log_level="WARNING")
                        for _ in range(self.n_workers)]
        results = await asyncio.gather(*[n.start() for n in self.nannies], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._close()
            raise RuntimeError("local cluster failed to start its workers: %s" % errors[0])
        return self

    async def _close(self):
        await asyncio.gather(*[n.close() for n in self.nannies], return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.close()

    def __repr__(self):
        return "<LocalCluster %s: %d workers>" % (
            self.scheduler.address if self.scheduler else "not started", len(self.nannies))
