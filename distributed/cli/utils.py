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


async def wait_for_signals(*events):
    """Return when SIGINT or SIGTERM arrives, or when any of ``events`` is set."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.ensure_future(stop.wait())] + [asyncio.ensure_future(e.wait()) for e in events]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return stop.is_set()
