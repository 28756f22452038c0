"""``dask-worker SCHEDULER``: run a worker (under a nanny by default)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .utils import install_signal_handlers, setup_logging, wait_for_signals

logger = logging.getLogger("distributed.cli.dask_worker")


def _bytes(text):
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError("not a size: %r (examples: 2GB, 500MB, 1e9)" % text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dask-worker", description="Start a distributed worker.")
    p.add_argument("scheduler", help="scheduler address, e.g. tcp://127.0.0.1:8786 or 127.0.0.1:8786")
    p.add_argument("--nthreads", type=int, default=os.cpu_count() or 1,
                   help="threads that run tasks (default: number of cores)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="worker port (default: any free port)")
    p.add_argument("--nanny-port", type=int, default=0, help="nanny port (default: any free port)")
    p.add_argument("--name", default=None, help="a name for this worker")
    p.add_argument("--no-nanny", dest="nanny", action="store_false",
                   help="run the worker in this process, without a supervising nanny")
    p.add_argument("--memory-limit", type=_bytes, default=0,
                   help="e.g. 2GB or 2000000000 (0: no limit). Past 80%% of it the worker "
                        "takes no new tasks; past 95%% it exits and its nanny starts a fresh one")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to keep trying to reach the scheduler (default 30)")
    p.add_argument("--parent-nanny", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def run_worker(args):
    from ..core import ConnectionPool
    from ..worker import Worker, _parent_watchdog

    stop = install_signal_handlers()
    w = Worker(args.scheduler, nthreads=args.nthreads, host=args.host, port=args.port,
               name=args.name, nanny=args.parent_nanny, connect_timeout=args.connect_timeout,
               memory_limit=args.memory_limit)
    try:
        await w.start()
    except (OSError, asyncio.TimeoutError, ValueError) as e:
        logger.error("worker could not join the scheduler at %s: %s", args.scheduler, e)
        await w.close()
        return 1
    if not args.parent_nanny:
        print("Worker at: %s" % w.address, file=sys.stderr, flush=True)
    if args.parent_nanny:
        _parent_watchdog(asyncio.get_running_loop(), w, os.getppid())
        pool = ConnectionPool()
        try:
            await pool.rpc(args.parent_nanny).worker_ready(address=w.address)
        finally:
            pool.close()
    await wait_for_signals(stop, w.finished)
    await w.close()
    return 0


async def run_nanny(args):
    from ..nanny import Nanny

    stop = install_signal_handlers()
    n = Nanny(args.scheduler, nthreads=args.nthreads, host=args.host, port=args.nanny_port,
              name=args.name, worker_port=args.port, memory_limit=args.memory_limit,
              start_timeout=args.connect_timeout + 30, connect_timeout=args.connect_timeout)
    try:
        await n.start()
    except (OSError, RuntimeError) as e:
        logger.error("could not start a worker for the scheduler at %s: %s", args.scheduler, e)
        await n.close()
        return 1
    print("Nanny at: %s, worker at: %s" % (n.address, n.worker_address), file=sys.stderr, flush=True)
    await wait_for_signals(stop)
    await n.close()
    return 0


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        from ..comm import parse_address

        parse_address(args.scheduler)
    except (ValueError, TypeError) as e:
        print("dask-worker: %s" % e, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(run_nanny(args) if args.nanny else run_worker(args)))


if __name__ == "__main__":
    main()
