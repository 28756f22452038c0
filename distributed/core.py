"""Servers that answer messages, and the ``rpc`` proxy that sends them.

A :class:`Server` holds one table from op name to handler.  Every message is a
dict with an ``op``; the handler is called as ``handler(comm, **msg)`` and its
return value is written back, unless the message says ``reply=False`` or the
handler returns :data:`NO_REPLY` (handlers that take over a connection as a
long-lived stream do so).

A remote call reads like a method call::

    >>> await rpc('tcp://127.0.0.1:8786', pool).who_has(keys=['x'])  # doctest: +SKIP

sends ``{'op': 'who-has', 'keys': ['x']}`` and returns the reply.  An error in
the handler comes back as ``{'status': 'error', ...}`` and is raised by the
caller as :class:`RemoteError`.

Bad input (bytes that do not decode, a message that is not a dict with an op,
an unknown op, missing arguments) costs only that connection.  Such events are
logged at most a few times per minute per server; the rest are counted in
``Server.bad_messages``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from .comm import CommClosedError, connect, listen
from .protocol import ProtocolError

logger = logging.getLogger(__name__)

NO_REPLY = object()


class RemoteError(Exception):
    """A handler on another server failed; the message says how."""


class RateLimitedLog:
    """Log the first few events per window, count the rest.

    >>> log = RateLimitedLog(logging.getLogger('x'), per_window=2, window=60)
    >>> [log.allow(now=0.0) for _ in range(3)]
    [True, True, False]
    >>> log.suppressed
    1
    """

    def __init__(self, logger, per_window=5, window=60.0):
        self.logger = logger
        self.per_window = per_window
        self.window = window
        self.start = None
        self.count = 0
        self.suppressed = 0
        self.total = 0

    def allow(self, now=None):
        now = time.monotonic() if now is None else now
        self.total += 1
        if self.start is None or now - self.start > self.window:
            if self.suppressed:
                self.logger.warning("... %d similar events not logged in the last %.0f s",
                                    self.suppressed, self.window)
            self.start, self.count, self.suppressed = now, 0, 0
        if self.count < self.per_window:
            self.count += 1
            return True
        self.suppressed += 1
        return False

    def warning(self, msg, *args):
        if self.allow():
            self.logger.warning(msg, *args)


def error_message(e: BaseException) -> dict:
    return {"status": "error", "type": type(e).__name__, "text": "%s: %s" % (type(e).__name__, e)}


class Server:
    """Answer messages on a listening address using ``self.handlers``."""

    default_handlers = ()

    def __init__(self, handlers: dict, name: str = "server"):
        self.handlers = {"identity": self.handle_identity}
        self.handlers.update(handlers)
        self.name = name
        self.listener = None
        self.address = None
        self.comms = set()
        self.bad_input = RateLimitedLog(logger)
        self.bad_messages = 0
        self.status = "created"

    async def handle_identity(self, comm):
        return {"type": type(self).__name__, "address": self.address}

    async def listen(self, addr: str):
        self.listener = await listen(addr, self.handle_comm)
        self.address = self.listener.address
        self.status = "running"

    def _bad(self, comm, why):
        self.bad_messages += 1
        self.bad_input.warning("%s: dropping connection from %s: %s", self.name, comm.peer_address, why)

    async def handle_comm(self, comm):
        """Serve one connection until it closes or misbehaves."""
        self.comms.add(comm)
        try:
            while not comm.closed():
                try:
                    msg = await comm.read()
                except CommClosedError:
                    return
                except ProtocolError as e:
                    self._bad(comm, e)
                    return
                if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                    self._bad(comm, "message is not a dict with an op: %.100r" % (msg,))
                    return
                op = msg.pop("op")
                reply = msg.pop("reply", True)
                handler = self.handlers.get(op)
                if handler is None:
                    self._bad(comm, "unknown op %.60r" % op)
                    if reply:
                        await self._write_quietly(comm, error_message(ValueError("unknown op %r" % op)))
                    return
                try:
                    result = handler(comm, **msg)
                    if asyncio.iscoroutine(result):
                        result = await result
                except CommClosedError:
                    return
                except TypeError as e:
                    # almost always missing or unexpected fields
                    self._bad(comm, "bad arguments for %r: %s" % (op, e))
                    if reply:
                        await self._write_quietly(comm, error_message(e))
                    return
                except Exception as e:
                    logger.exception("%s: handler for %r failed", self.name, op)
                    result = error_message(e)
                if reply and result is not NO_REPLY:
                    try:
                        await comm.write(result)
                    except CommClosedError:
                        return
                # an idle connection must not pin the last request or reply:
                # a get-data reply holds the data it sent (RSS grew by the
                # size of each 500 MB array fetched, never freed)
                msg = result = None
        finally:
            self.comms.discard(comm)
            comm.abort()

    async def _write_quietly(self, comm, msg):
        try:
            await comm.write(msg)
        except CommClosedError:
            pass

    def stop_listening(self):
        if self.listener is not None:
            self.listener.stop()
            self.listener = None

    def close_comms(self):
        for comm in list(self.comms):
            comm.abort()
        self.comms.clear()


async def send_recv(comm, **msg):
    await comm.write(msg)
    response = await comm.read()
    if isinstance(response, dict) and response.get("status") == "error":
        raise RemoteError(response.get("text", "remote error"))
    return response


class ConnectionPool:
    """Reuse connections per address.

    At most ``limit`` connections are in use at once (a caller waits for a
    slot); idle ones are kept for reuse and closed when a new connection is
    needed while ``limit`` are open.
    """

    def __init__(self, limit: int = 256, timeout: float = 10.0):
        self.available = defaultdict(list)
        self.open = 0
        self.limit = limit
        self.timeout = timeout
        self.semaphore = None
        self.closed = False

    async def connect(self, addr, timeout=None):
        if self.closed:
            raise CommClosedError("connection pool is closed")
        if self.semaphore is None:
            self.semaphore = asyncio.Semaphore(self.limit)
        await self.semaphore.acquire()
        try:
            idle = self.available.get(addr)
            while idle:
                comm = idle.pop()
                if not comm.closed():
                    comm.reused = True
                    return comm
                self.open -= 1
            if self.open >= self.limit:
                self._close_idle()
            comm = await connect(addr, timeout=self.timeout if timeout is None else timeout)
        except BaseException:
            self.semaphore.release()
            raise
        self.open += 1
        return comm

    def _close_idle(self):
        for addr in list(self.available):
            self.remove(addr)

    def reuse(self, addr, comm):
        """Give back a connection obtained from :meth:`connect`."""
        self.semaphore.release()
        if comm.closed() or self.closed:
            self.open -= 1
            comm.abort()
        else:
            self.available[addr].append(comm)

    def remove(self, addr):
        """Close the idle connections to ``addr``."""
        for comm in self.available.pop(addr, []):
            comm.abort()
            self.open -= 1

    def close(self):
        self.closed = True
        self._close_idle()

    def rpc(self, addr):
        return rpc(addr, self)


class rpc:
    """Proxy: ``await rpc(addr, pool).some_op(**kw)`` sends op ``some-op``."""

    def __init__(self, address, pool: ConnectionPool):
        self.address = address
        self.pool = pool

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        op = name.replace("_", "-")

        async def call(**kwargs):
            for attempt in (0, 1):
                comm = await self.pool.connect(self.address)
                reused = getattr(comm, "reused", False)
                try:
                    return await send_recv(comm, op=op, **kwargs)
                except CommClosedError:
                    comm.abort()
                    if not reused or attempt:
                        raise
                    # an idle pooled connection whose peer went away (for
                    # instance a restarted scheduler): try a fresh one
                except BaseException:
                    # also after an error reply: the server may have dropped
                    # the connection (it does after malformed requests)
                    comm.abort()
                    raise
                finally:
                    self.pool.reuse(self.address, comm)

        call.__name__ = name
        return call
