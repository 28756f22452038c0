"""The seed's example: sum a billion random numbers on the local cluster.

    python examples/random_sum.py            # 1e9 elements
    python examples/random_sum.py 1e8        # smaller

Computes ``da.random.random(n, chunks=1_000_000).sum()`` on an embedded local
cluster with ``compute(get=executor.get)`` (the seed's spelling), prints the
value, the wall time, the same computation on dask's local threaded
scheduler, and the peak resident memory of the whole cluster (this process,
which also runs the scheduler, plus every worker process), sampled every
50 ms.
"""
import sys
import threading
import time

import psutil

import dask.array as da
from distributed import Executor


class PeakMemory:
    """Sample the summed RSS of a process and all its children."""

    def __init__(self, interval=0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self):
        me = psutil.Process()
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._total()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(n=1_000_000_000):
    n = int(n)
    with Executor() as executor:
        x = da.random.random(n, chunks=(1_000_000,)).sum()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            value = x.compute(get=executor.get)
            cluster_s = time.perf_counter() - t0
        print("sum of %.0e random numbers on the cluster: %.1f (expected about %.0f)"
              % (n, value, n / 2))
        print("cluster: %.2f s, peak memory of the whole cluster %.0f MB"
              % (cluster_s, mem.peak / 1e6))
    t0 = time.perf_counter()
    local = da.random.random(n, chunks=(1_000_000,)).sum().compute(scheduler="threads")
    threads_s = time.perf_counter() - t0
    print("dask's local threads: %.2f s (value %.1f)" % (threads_s, local))
    return value, cluster_s, threads_s, mem.peak


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1e9)
