"""The ``Comm`` contract and address handling.

A ``Comm`` moves whole messages (see :mod:`distributed.protocol`) between two
endpoints.  ``read()`` returns the next message or raises
:class:`CommClosedError`; ``write(msg)`` sends one.  A connection that sends
bytes which do not decode is closed after raising
:class:`~distributed.protocol.ProtocolError` to the reader: bad input costs
that one connection, nothing else.
"""
from __future__ import annotations

import asyncio


class CommClosedError(IOError):
    """The other end went away, or this end was closed."""


def parse_address(addr: str, default_port: int | None = None) -> tuple:
    """``'tcp://127.0.0.1:8786'`` to ``('127.0.0.1', 8786)``.

    >>> parse_address('tcp://127.0.0.1:8786')
    ('127.0.0.1', 8786)
    >>> parse_address('alice:80')
    ('alice', 80)
    >>> parse_address('[::1]:9000')
    ('::1', 9000)
    """
    if not isinstance(addr, str):
        raise TypeError("An address is a string like 'tcp://127.0.0.1:8786', got %r" % (addr,))
    scheme, sep, rest = addr.rpartition("://")
    if sep and scheme != "tcp":
        raise ValueError("Unsupported address scheme %r in %r (only tcp://)" % (scheme, addr))
    host, sep, port = rest.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError("Address %r has no port (expected host:port)" % addr)
        host, port = rest, default_port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port)
    except ValueError:
        raise ValueError("Address %r has a non-numeric port" % addr) from None
    if not 0 <= port < 65536:
        raise ValueError("Address %r has a port out of range" % addr)
    return host or "127.0.0.1", port


def normalize_address(addr: str) -> str:
    """Canonical URI form.

    >>> normalize_address('127.0.0.1:8786')
    'tcp://127.0.0.1:8786'
    """
    host, port = parse_address(addr)
    if ":" in host:
        host = "[%s]" % host
    return "tcp://%s:%d" % (host, port)


class Comm:
    """One end of a message connection."""

    peer_address: str = ""
    local_address: str = ""

    async def read(self):
        raise NotImplementedError

    async def write(self, msg) -> int:
        raise NotImplementedError

    async def close(self):
        raise NotImplementedError

    def abort(self):
        raise NotImplementedError

    def closed(self) -> bool:
        raise NotImplementedError


class Listener:
    address: str = ""

    def stop(self):
        raise NotImplementedError


async def connect(addr: str, timeout: float = 10.0) -> Comm:
    """Open a connection to ``addr``, retrying refused connections until
    ``timeout`` seconds have passed, then raise ``OSError`` saying so."""
    from .tcp import tcp_connect

    host, port = parse_address(addr)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    while True:
        try:
            left = deadline - loop.time()
            return await asyncio.wait_for(tcp_connect(host, port), max(left, 0.001))
        except (OSError, asyncio.TimeoutError) as e:
            if loop.time() + delay >= deadline:
                raise OSError("Timed out after %.1f s trying to connect to %s: %s"
                              % (timeout, normalize_address(addr), e or type(e).__name__)) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def listen(addr: str, handle_comm) -> Listener:
    """Serve ``addr`` (port 0 picks a free one); ``handle_comm(comm)`` is a
    coroutine function run for each new connection."""
    from .tcp import TCPListener

    host, port = parse_address(addr, default_port=0)
    listener = TCPListener(host, port, handle_comm)
    await listener.start()
    return listener
