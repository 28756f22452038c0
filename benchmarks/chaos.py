"""Chaos runs: a 10,000-task tree reduction on 3 workers while a random
worker process is SIGKILLed every few seconds (its nanny brings it back).

    python benchmarks/chaos.py --intervals 2,5,10 --runs 3

Prints, for each interval, how many runs gave the right result within
``--timeout`` seconds, and their times.  The cluster, the killer and the
graph are those of ``tests/test_resilience.py`` (the CI test is the 2 s case).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from test_resilience import Killer, add, chaos_leaf, proc_cluster, tree_sum  # noqa: E402


def one_run(interval, n, timeout, seed):
    expected = tree_sum(i * i for i in range(n))  # chaos_leaf(i), without its sleeps
    logdir = tempfile.mkdtemp(prefix="chaos-")
    try:
        with proc_cluster(logdir, nworkers=3) as (e, c):
            killer = Killer(c, interval=interval, seed=seed)
            t0 = time.monotonic()
            killer.start()
            try:
                level = e.map(chaos_leaf, range(n))
                while len(level) > 1:
                    nxt = e.map(add, level[0::2], level[1::2])
                    if len(level) % 2:
                        nxt.append(level[-1])
                    level = nxt
                (root,) = level
                del level, nxt
                try:
                    ok = root.result(timeout=timeout) == expected
                except Exception as exc:  # a failed run is a figure, not a crash
                    print("  run failed: %s: %s" % (type(exc).__name__, str(exc)[:200]))
                    ok = False
            finally:
                killer.stop()
            return ok, time.monotonic() - t0, len(killer.kills)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--intervals", default="2,5,10", help="seconds between kills (comma list)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--leaves", type=int, default=5000, help="leaves of the tree (tasks: 2x)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take")
    args = p.parse_args()
    for interval in [float(x) for x in args.intervals.split(",")]:
        results = [one_run(interval, args.leaves, args.timeout, seed)
                   for seed in range(args.runs)]
        good = [r for r in results if r[0]]
        print("kill every %4.1f s: %d of %d runs right; times %s; kills %s" % (
            interval, len(good), len(results), ["%.1f" % r[1] for r in results],
            [r[2] for r in results]), flush=True)


if __name__ == "__main__":
    main()
