"""What the command-line daemons share: logging set-up and signal handling."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys


def setup_logging(level="INFO"):
    """Log to stderr.  Only the CLIs call this; the library never configures logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("distributed")
    root.addHandler(handler)
    root.setLevel(level)


def install_signal_handlers():
    """Turn SIGINT and SIGTERM into an Event on the running loop.  Call it
    before starting anything, so that a signal that arrives during start-up
    also leads to a clean stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signals(stop, *events):
    """Return when ``stop`` (from :func:`install_signal_handlers`) or any of
    ``events`` is set; True if it was a signal."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, *events)]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    return stop.is_set()
