"""``dask-scheduler``: run a scheduler until SIGINT or SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .utils import install_signal_handlers, setup_logging, wait_for_signals

logger = logging.getLogger("distributed.cli.dask_scheduler")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dask-scheduler", description="Start a distributed scheduler.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8786, help="port to listen on (default 8786; 0 = any)")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0,
                   help="seconds of silence after which a worker is presumed hung (default 30)")
    p.add_argument("--allowed-failures", type=int, default=3,
                   help="worker deaths a task may cause before it errs with KilledWorker (default 3)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def run(args):
    from ..scheduler import Scheduler

    stop = install_signal_handlers()
    s = Scheduler(host=args.host, port=args.port, heartbeat_timeout=args.heartbeat_timeout,
                  allowed_failures=args.allowed_failures)
    try:
        await s.start()
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    print("Scheduler at: %s" % s.address, file=sys.stderr, flush=True)
    await wait_for_signals(stop)
    logger.info("scheduler %s stopping", s.address)
    await s.close()
    return 0


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.log_level)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
