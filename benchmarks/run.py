#!/usr/bin/env python
"""Benchmarks for ``distributed`` on a fresh local cluster started from its CLIs.

    python benchmarks/run.py [--reps N] [--json PATH] [--workloads latency,throughput,transfer]

Starts one ``dask-scheduler`` and two ``dask-worker --nthreads 1`` processes
on free ports of 127.0.0.1 (each in its own session), runs the workloads
below, prints the figures, and kills every process it started, also on an
error, on Ctrl-C, on SIGTERM and when the overall ``--timeout`` runs out.

Workloads:

* ``latency``: round trip of ``submit(inc, i, pure=False).result()``;
  median and p90 of 300 calls after 20 warm-up calls, in microseconds.
* ``throughput``: tasks per second of ``gather(map(inc, range(N), pure=False))``
  for N = 1000 and 10000, best and median of ``--reps`` (default 3); also
  the CPU time per task used by the scheduler and by the workers (every
  process of each started session: nanny and worker) during those runs,
  read from ``/proc/<pid>/stat``.
* ``transfer``: MB/s moving a 100 MB float64 array made on worker A to a task
  on worker B: ``100 / (t_dependent - t_baseline)`` where ``t_baseline`` is
  the same with a 1 kB array; median of ``--reps`` (default 5).

See README.rst beside this file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# ---------------------------------------------------------------- task functions
# Module level on purpose: run.py is __main__, so these are pickled by value
# and the workers need not import this file.


def inc(x):
    return x + 1


def make_array(nbytes):
    import numpy as np

    return np.ones(nbytes // 8, dtype="float64")


def consume(x):
    return int(x.nbytes)


# ---------------------------------------------------------------- helpers

MB = 1_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKLOADS = ("latency", "throughput", "transfer")
ALIASES = {"1": "latency", "2": "throughput", "3": "transfer", "4": "throughput",
           "cpu": "throughput", "roundtrip": "latency", "map": "throughput"}


class BenchTimeout(Exception):
    pass


class Terminated(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_table():
    """pid -> (pgid, session id, utime + stime in clock ticks), for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses
        fields = data[data.rindex(b")") + 2:].split()
        # fields[0] is field 3 (state); pgrp=5, session=6, utime=14, stime=15
        out[int(name)] = (int(fields[2]), int(fields[3]), int(fields[11]) + int(fields[12]))
    return out


def session_cpu(sids):
    """Session id -> CPU seconds (utime + stime) of its live members."""
    totals = dict.fromkeys(sids, 0)
    for _, (_, sid, ticks) in proc_table().items():
        if sid in totals:
            totals[sid] += ticks
    return {sid: t / CLK_TCK for sid, t in totals.items()}


def session_members(sids):
    counts = dict.fromkeys(sids, 0)
    for _, (_, sid, _) in proc_table().items():
        if sid in counts:
            counts[sid] += 1
    return counts


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------- the cluster


class Cluster:
    """One scheduler and two workers, each started in a new session."""

    def __init__(self, nworkers=2, nthreads=1):
        self.nworkers = nworkers
        self.nthreads = nthreads
        self.procs = []  # (role, Popen, logfile path)
        self.logdir = tempfile.mkdtemp(prefix="distributed-bench-")
        self.address = None
        self._stopped = False
        self._lock = threading.Lock()

    def _env(self):
        import distributed

        env = dict(os.environ)
        # children import the same package as this process
        root = os.path.dirname(os.path.dirname(os.path.abspath(distributed.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start(self, role, args):
        path = os.path.join(self.logdir, "%s.log" % role)
        with open(path, "wb") as logf:
            p = subprocess.Popen([sys.executable, "-m"] + args, stdin=subprocess.DEVNULL,
                                 stdout=logf, stderr=subprocess.STDOUT, env=self._env(),
                                 cwd=self.logdir, start_new_session=True)
        with self._lock:
            self.procs.append((role, p, path))
        return p

    def start(self, deadline):
        port = free_port()
        self.address = "tcp://127.0.0.1:%d" % port
        sched = self._start("scheduler", ["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                          "--port", str(port)])
        while True:  # wait until the scheduler accepts connections
            if sched.poll() is not None:
                raise RuntimeError("dask-scheduler exited with code %s\n%s"
                                   % (sched.returncode, self.tail("scheduler")))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("dask-scheduler did not listen on port %d in time\n%s"
                                   % (port, self.tail("scheduler")))
            time.sleep(0.05)
        for i in range(self.nworkers):
            self._start("worker%d" % i, ["distributed.cli.dask_worker", self.address,
                                         "--nthreads", str(self.nthreads), "--host", "127.0.0.1",
                                         "--name", "bench-%d" % i])

    def check_alive(self):
        for role, p, _ in self.procs:
            if p.poll() is not None:
                raise RuntimeError("%s exited with code %s\n%s" % (role, p.returncode, self.tail(role)))

    def tail(self, role, n=20):
        for r, _, path in self.procs:
            if r == role:
                try:
                    with open(path, "rb") as f:
                        lines = f.read().decode(errors="replace").splitlines()
                except OSError:
                    return ""
                return "\n".join("  [%s] %s" % (role, line) for line in lines[-n:])
        return ""

    @property
    def sessions(self):
        """Role -> session id (= the pid of the process started in it)."""
        return {role: p.pid for role, p, _ in self.procs}

    def stop(self, grace=5.0):
        """SIGTERM every started session's process group, then SIGKILL what is left."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            procs = list(self.procs)
        pgids = {p.pid for _, p, _ in procs}

        def signal_all(sig):
            for pg in pgids:
                try:
                    os.killpg(pg, sig)
                except (ProcessLookupError, PermissionError):
                    pass

        def alive():
            for _, p, _ in procs:
                p.poll()  # reap leaders so they do not linger as zombies
            return {pid for pid, (pg, sid, _) in proc_table().items()
                    if pg in pgids or sid in pgids}

        signal_all(signal.SIGTERM)
        end = time.monotonic() + grace
        while alive() and time.monotonic() < end:
            time.sleep(0.05)
        left = alive()
        if left:
            signal_all(signal.SIGKILL)
            for pid in left:  # a member that left its process group but not the session
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for _, p, _ in procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------- workloads


def bench_latency(e, res):
    for i in range(20):
        e.submit(inc, i, pure=False).result()
    lat = []
    for i in range(300):
        t0 = time.perf_counter()
        e.submit(inc, i, pure=False).result()
        lat.append((time.perf_counter() - t0) * 1e6)
    res["latency"] = {"n": len(lat), "median_us": statistics.median(lat),
                      "p90_us": percentile(lat, 0.9), "min_us": min(lat)}


def bench_throughput(e, res, cluster, reps):
    sessions = cluster.sessions
    sched_sid = sessions["scheduler"]
    worker_sids = [sid for role, sid in sessions.items() if role.startswith("worker")]
    sids = list(sessions.values())

    e.gather(e.map(inc, range(500), pure=False))  # warm up
    time.sleep(0.2)

    # idle CPU over one second, to judge the per-task figures
    c0, t0 = session_cpu(sids), time.monotonic()
    time.sleep(1.0)
    c1, dt = session_cpu(sids), time.monotonic() - t0
    idle = {"scheduler_pct": (c1[sched_sid] - c0[sched_sid]) / dt * 100,
            "workers_pct": sum(c1[s] - c0[s] for s in worker_sids) / dt * 100}

    out = {"idle_cpu": idle}
    for n in (1000, 10000):
        rates, cpu = [], {sid: 0.0 for sid in sids}
        for _ in range(reps):
            c0 = session_cpu(sids)
            t0 = time.perf_counter()
            futures = e.map(inc, range(n), pure=False)
            results = e.gather(futures)
            elapsed = time.perf_counter() - t0
            assert results[-1] == n, results[-1]
            del futures, results
            time.sleep(0.25)  # let the releases settle: they are part of the cost
            c1 = session_cpu(sids)
            for sid in sids:
                cpu[sid] += c1[sid] - c0[sid]
            rates.append(n / elapsed)
        tasks = n * reps
        out["map%d" % n] = {
            "n": n, "reps": reps, "tasks_per_s": rates,
            "best_tasks_per_s": max(rates), "median_tasks_per_s": statistics.median(rates),
            "cpu_us_per_task": {
                "scheduler": cpu[sched_sid] / tasks * 1e6,
                "workers": sum(cpu[s] for s in worker_sids) / tasks * 1e6,
                "per_worker": [cpu[s] / tasks * 1e6 for s in worker_sids],
            },
        }
    res["throughput"] = out


def bench_transfer(e, res, reps, size_mb=100):
    from distributed import wait

    workers = sorted(e.ncores())
    A, B = workers[0], workers[1]

    def once(nbytes):
        src = e.submit(make_array, nbytes, pure=False, workers=[A])
        wait([src], timeout=60)
        if src.status != "finished":
            src.result()  # raises the task's error
        t0 = time.perf_counter()
        dep = e.submit(consume, src, pure=False, workers=[B])
        got = dep.result(timeout=60)
        dt = time.perf_counter() - t0
        assert got == nbytes // 8 * 8, (got, nbytes)
        where = e.who_has([src, dep])
        assert where[src.key] and A in where[src.key], where
        assert where[dep.key] == [B] or B in where[dep.key], where
        del src, dep
        return dt

    once(1000)  # warm up
    once(MB)
    base, dep_t, rates = [], [], []
    for _ in range(reps):
        tb = once(1000)
        td = once(size_mb * MB)
        base.append(tb)
        dep_t.append(td)
        rates.append(size_mb / (td - tb) if td > tb else float("inf"))
    res["transfer"] = {"size_mb": size_mb, "reps": reps, "worker_a": A, "worker_b": B,
                       "baseline_ms": [t * 1e3 for t in base],
                       "dependent_ms": [t * 1e3 for t in dep_t],
                       "mb_per_s": rates, "median_mb_per_s": statistics.median(rates)}


# ---------------------------------------------------------------- report


def report(res):
    lines = []
    meta = res["meta"]
    lines.append("distributed %s, Python %s, %d cores, load average before: %s"
                 % (meta["distributed_version"], meta["python"], meta["cpu_count"],
                    " ".join("%.2f" % x for x in meta["loadavg_before"])))
    lines.append("cluster: 1 scheduler + 2 workers x 1 thread (%s), %.1f s to start"
                 % (meta["scheduler"], meta["cluster_start_s"]))
    if "latency" in res:
        r = res["latency"]
        lines.append("1. round trip submit(inc).result():   median %8.0f us   p90 %8.0f us   (%d calls)"
                     % (r["median_us"], r["p90_us"], r["n"]))
    if "throughput" in res:
        r = res["throughput"]
        for key in ("map1000", "map10000"):
            m = r[key]
            lines.append("2. gather(map(inc, range(%5d))):      best %8.0f tasks/s   median %8.0f tasks/s   (%d reps)"
                         % (m["n"], m["best_tasks_per_s"], m["median_tasks_per_s"], m["reps"]))
        for key in ("map1000", "map10000"):
            c = r[key]["cpu_us_per_task"]
            lines.append("4. CPU per task, map of %5d:         scheduler %6.1f us   workers %6.1f us (%s)"
                         % (r[key]["n"], c["scheduler"], c["workers"],
                            " + ".join("%.1f" % x for x in c["per_worker"])))
        lines.append("   idle CPU before the runs:           scheduler %5.1f %%   workers %5.1f %%"
                     % (r["idle_cpu"]["scheduler_pct"], r["idle_cpu"]["workers_pct"]))
    if "transfer" in res:
        r = res["transfer"]
        lines.append("3. %d MB float64 worker A -> B:       median %8.0f MB/s   (%d reps; baseline %.1f ms, dependent %.1f ms median)"
                     % (r["size_mb"], r["median_mb_per_s"], r["reps"],
                        statistics.median(r["baseline_ms"]), statistics.median(r["dependent_ms"])))
    lines.append("load average after: %s; total %.1f s"
                 % (" ".join("%.2f" % x for x in meta["loadavg_after"]), meta["total_s"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions of the throughput (default 3) and transfer (default 5) workloads")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON here")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of %s (default: all)" % ",".join(WORKLOADS))
    p.add_argument("--timeout", type=float, default=110.0,
                   help="overall seconds before everything is killed (default 110)")
    args = p.parse_args(argv)
    chosen = []
    for w in args.workloads.split(","):
        w = ALIASES.get(w.strip().lower(), w.strip().lower())
        if not w:
            continue
        if w not in WORKLOADS:
            p.error("unknown workload %r; choose from %s" % (w, ", ".join(WORKLOADS)))
        if w not in chosen:
            chosen.append(w)
    if not chosen:
        p.error("no workloads chosen")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    args.workloads = chosen
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.timeout
    cluster = Cluster()

    # 1) soft timeout: SIGALRM raises in the main thread and the finally block cleans up;
    # 2) hard timeout: if that cleanup hangs, a watchdog kills the sessions and exits.
    def on_alarm(signum, frame):
        raise BenchTimeout("benchmarks did not finish within %.0f s" % args.timeout)

    def on_term(signum, frame):
        raise Terminated("terminated by signal %d" % signum)

    def hard_stop():
        log("benchmarks: cleanup hung; killing the cluster and exiting")
        try:
            cluster.stop(grace=0.5)
        finally:
            os._exit(3)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    watchdog = threading.Timer(args.timeout + 20, hard_stop)
    watchdog.daemon = True
    watchdog.start()

    e = None
    rc = 0
    try:
        import distributed
        from distributed import Executor

        res = {"meta": {
            "distributed_version": getattr(distributed, "__version__", "?"),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()), "workloads": args.workloads,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }}
        log("starting a scheduler and 2 workers (logs in %s)" % cluster.logdir)
        cluster.start(min(deadline, time.monotonic() + 60))
        e = Executor(cluster.address, timeout=30, set_as_default=False)
        while True:  # wait for both workers
            ncores = e.ncores()
            if len(ncores) >= 2:
                break
            cluster.check_alive()
            if time.monotonic() > deadline:
                raise BenchTimeout("the workers did not join in time")
            time.sleep(0.1)
        res["meta"]["scheduler"] = cluster.address
        res["meta"]["workers"] = ncores
        res["meta"]["cluster_start_s"] = time.monotonic() - start
        counts = session_members(list(cluster.sessions.values()))
        res["meta"]["session_members"] = {role: counts[sid] for role, sid in cluster.sessions.items()}

        for w in args.workloads:
            log("running %s ..." % w)
            if w == "latency":
                bench_latency(e, res)
            elif w == "throughput":
                bench_throughput(e, res, cluster, args.reps or 3)
            elif w == "transfer":
                bench_transfer(e, res, args.reps or 5)
            cluster.check_alive()
        res["meta"]["loadavg_after"] = list(os.getloadavg())
        res["meta"]["total_s"] = time.monotonic() - start
        print(report(res), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2, sort_keys=True)
            log("wrote %s" % args.json)
    except KeyboardInterrupt:
        log("benchmarks: interrupted")
        rc = 130
    except (BenchTimeout, Terminated) as exc:
        log("benchmarks: %s" % exc)
        rc = 124 if isinstance(exc, BenchTimeout) else 143
    except Exception as exc:  # report, clean up, fail
        import traceback

        traceback.print_exc()
        log("benchmarks failed: %s: %s" % (type(exc).__name__, exc))
        for role, _, _ in cluster.procs:
            t = cluster.tail(role, 10)
            if t:
                log(t)
        rc = 1
    finally:
        # a second Ctrl-C, SIGTERM or alarm must not skip the cleanup
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if e is not None:
                try:
                    e.close(timeout=5)
                except Exception:
                    pass
        finally:
            cluster.stop()
            watchdog.cancel()
            if rc == 0:
                shutil.rmtree(cluster.logdir, ignore_errors=True)
            else:
                log("logs kept in %s" % cluster.logdir)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return rc


if __name__ == "__main__":
    sys.exit(main())
