"""Many small messages to one peer, written as one list.

``send`` never blocks and never writes by itself.  The first message after a
quiet spell is written on the next loop iteration (so a lone request is not
delayed); while a write is in flight, or within ``interval`` seconds of the
last one, messages accumulate and go out together.  Per-task messages
therefore cost one socket write per batch, not one per task.
"""
from __future__ import annotations

import asyncio
import logging

from .comm import CommClosedError

logger = logging.getLogger(__name__)


class BatchedSend:
    """Batch messages to one ``Comm``.

    >>> bs = BatchedSend(interval=0)       # doctest: +SKIP
    >>> bs.start(comm)                          # doctest: +SKIP
    >>> bs.send({'op': 'task-finished', 'key': 'x'})   # doctest: +SKIP
    """

    def __init__(self, interval: float = 0.002, name: str = ""):
        self.interval = interval
        self.name = name
        self.comm = None
        self.buffer = []
        self.task = None
        self.wake = None
        self.closing = False
        self.batches = 0
        self.messages = 0

    def start(self, comm):
        self.comm = comm
        self.wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._background())
        if self.buffer:
            self.wake.set()

    def __repr__(self):
        return "<BatchedSend %s: %d in buffer>" % (self.name, len(self.buffer))

    def send(self, *msgs):
        if self.closing:
            raise CommClosedError("BatchedSend %s is closed" % self.name)
        self.buffer.extend(msgs)
        if self.wake is not None:
            self.wake.set()

    async def _background(self):
        loop = asyncio.get_running_loop()
        last = 0.0
        try:
            while True:
                if not self.buffer:
                    if self.closing:
                        return
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                wait = last + self.interval - loop.time()
                if wait > 0 and not self.closing:
                    # a close() during this pause flushes at once
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    if not self.closing:
                        continue
                payload, self.buffer = self.buffer, []
                self.batches += 1
                self.messages += len(payload)
                last = loop.time()
                await self.comm.write(payload)
        except CommClosedError:
            logger.debug("BatchedSend %s: connection closed, %d messages dropped",
                         self.name, len(self.buffer))
        except asyncio.CancelledError:
            pass
        finally:
            self.closing = True

    async def close(self, timeout: float = 5.0):
        """Flush what is buffered (within ``timeout``), then close the comm."""
        if self.task is None:
            self.closing = True
            return
        self.closing = True
        self.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except (asyncio.TimeoutError, CommClosedError, asyncio.CancelledError):
            self.task.cancel()
        if self.comm is not None:
            await self.comm.close()

    def abort(self):
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        if self.comm is not None:
            self.comm.abort()
