"""The worker's state machine: which tasks to fetch, run, keep and drop.

Rules of this module: no I/O, no clocks, no threads.  Stimuli go in
(``stimulus_*``), a list of instructions comes out; the worker server
(:mod:`distributed.worker`) carries them out and feeds the outcomes back in as
new stimuli.  Instructions are tuples:

* ``("execute", key)``: run the task in a thread
* ``("gather", worker_address, [keys])``: fetch data from a peer
* ``("send", msg)``: send ``msg`` to the scheduler
* ``("delete", [keys])``: drop data from memory
* ``("abandon", key)``: nobody wants the running task; its thread no longer
  counts against ``nthreads`` (``("resume", key)`` undoes that)

Theory of operation.  ``compute-task`` names a task and, for each
dependency, the workers holding it.  Missing dependencies are fetched straight
from a peer (``fetch -> flight -> memory``); when all are here the task is
``ready`` and runs in priority order, at most ``nthreads`` at a time.  Its
result stays in memory, owned by this worker, until the scheduler says
``free-keys``.  Copies fetched for a local task are private: they are
dropped as soon as no local task needs them, and the scheduler never hears
of them.  A copy the scheduler asked for (``acquire-replicas``: while workers
are dying, or for ``Executor.replicate``) is owned like a result and
reported with ``add-keys``.

A task freed while it runs becomes ``cancelled`` and leaves ``executing``, so
its thread slot goes to the next task; its result is dropped when the thread
finishes, unless a new ``compute-task`` for it arrived meanwhile
(then that run's id is reported).  A dependency no listed peer can supply is
reported as ``missing-data`` and the task is dropped; the scheduler
reassigns it.

State:

* ``tasks``: key -> :class:`WTask` (tasks to run and data to fetch or hold)
* ``ready``: heap of ``(priority, counter, key)`` of tasks ready to run
* ``executing``: set of keys handed to the thread pool and still wanted
  (running, or queued there: at most ``nthreads + prefetch``)
* ``in_flight``: peer address -> set of keys being fetched from it
* ``to_fetch``: keys in ``fetch`` (may hold stale keys; checked on use)
"""
from __future__ import annotations

import heapq
from collections import deque

WAITING = "waiting"      # some dependencies are not here yet
READY = "ready"
EXECUTING = "executing"
CANCELLED = "cancelled"  # executing, but the scheduler no longer wants it
MEMORY = "memory"
FETCH = "fetch"          # data to get from a peer
FLIGHT = "flight"        # being fetched


class WTask:
    """A key this worker knows about.

    * ``run_spec``/``priority``/``run_id``: set if the scheduler asked us to run it
    * ``owned``: the scheduler assigned it here, so its data is kept until
      ``free-keys`` (else it is a private copy, kept while needed locally)
    * ``dependencies``: keys it needs; ``waiting_for``: those not yet here
    * ``dependents``: local tasks that need this key
    * ``who_has``: peers to fetch it from (for FETCH/FLIGHT)
    """

    __slots__ = ("key", "state", "run_spec", "priority", "run_id", "owned", "report",
                 "dependencies", "waiting_for", "dependents", "who_has", "tried", "nbytes")

    def __init__(self, key, state):
        self.key = key
        self.state = state
        self.run_spec = None
        self.priority = None
        self.run_id = None
        self.owned = False
        self.report = False
        self.dependencies = set()
        self.waiting_for = set()
        self.dependents = set()
        self.who_has = []
        self.tried = []
        self.nbytes = 0

    def __repr__(self):
        return "<WTask %r %s>" % (self.key, self.state)


class WorkerState:
    """See the module docstring."""

    def __init__(self, address, nthreads=1, max_fetches=8, validate=False, prefetch=1):
        self.address = address
        self.nthreads = nthreads
        # Tasks handed to the thread pool beyond its threads wait in its
        # queue, so a thread starts the next task without waiting for the
        # event loop to hear that the last one finished.  Measured: +30% on
        # tiny tasks; the cost is that a task arriving later with a higher
        # priority waits behind ``prefetch`` tasks.
        self.prefetch = prefetch
        self.max_fetches = max_fetches
        self.validate = validate
        self.tasks = {}
        self.ready = []
        self.executing = set()
        self.in_flight = {}
        self.to_fetch = set()
        self.paused = False
        self._counter = 0
        self.log = deque(maxlen=10000)

    # ------------------------------------------------------------ helpers
    def _ensure(self, key, state):
        wt = self.tasks.get(key)
        if wt is None:
            wt = self.tasks[key] = WTask(key, state)
        return wt

    def _push_ready(self, wt, out):
        wt.state = READY
        self._counter += 1
        heapq.heappush(self.ready, (wt.priority, self._counter, wt.key))

    def _schedule(self, out):
        """Start ready tasks while threads are free; start fetches."""
        while self.ready and len(self.executing) < self.nthreads + self.prefetch \
                and not self.paused:
            _, _, key = heapq.heappop(self.ready)
            wt = self.tasks.get(key)
            if wt is None or wt.state != READY:
                continue
            wt.state = EXECUTING
            self.executing.add(key)
            out.append(("execute", key))
        self._start_fetches(out)
        if self.validate:
            self.validate_state()
        return out

    def _start_fetches(self, out):
        if len(self.in_flight) >= self.max_fetches:
            return
        by_peer = {}
        for key in list(self.to_fetch):
            wt = self.tasks.get(key)
            if wt is None or wt.state != FETCH:
                self.to_fetch.discard(key)
                continue
            peers = [p for p in wt.who_has if p not in wt.tried] or []
            if not peers:
                continue
            # prefer a peer we are already fetching from less
            peer = min(peers, key=lambda p: len(self.in_flight.get(p, ())))
            if peer in self.in_flight:
                continue  # one request per peer at a time; it picks up the rest later
            by_peer.setdefault(peer, []).append(wt)
        for peer, wts in by_peer.items():
            if len(self.in_flight) >= self.max_fetches:
                break
            keys = []
            for wt in wts:
                wt.state = FLIGHT
                self.to_fetch.discard(wt.key)
                keys.append(wt.key)
            self.in_flight[peer] = set(keys)
            out.append(("gather", peer, keys))

    def _release_if_unneeded(self, wt, out):
        """Drop a key no one here needs and the scheduler does not own here."""
        if wt.owned or wt.dependents or wt.state in (EXECUTING, CANCELLED, FLIGHT):
            return
        if wt.state == MEMORY:
            out.append(("delete", [wt.key]))
        del self.tasks[wt.key]

    def _forget_task(self, wt, out):
        """Remove a task that will not run here (freed, or reassigned)."""
        for dep in wt.dependencies:
            dwt = self.tasks.get(dep)
            if dwt is not None:
                dwt.dependents.discard(wt.key)
                self._release_if_unneeded(dwt, out)
        wt.dependencies = set()
        wt.waiting_for = set()
        wt.run_spec = None
        wt.owned = False
        self._release_if_unneeded(wt, out)

    # ------------------------------------------------------------ stimuli
    def stimulus_compute_task(self, key, run_spec, priority, run_id, who_has=None, nbytes=None,
                              report=False):
        self.log.append(("compute-task", key, run_id))
        out = []
        wt = self.tasks.get(key)
        if wt is not None and wt.state == MEMORY:
            wt.owned = True
            wt.run_id = run_id
            out.append(("send", {"op": "task-finished", "key": key, "run_id": run_id,
                                 "nbytes": wt.nbytes, "type": None}))
            return self._schedule(out)
        if wt is not None and wt.state in (EXECUTING, CANCELLED):
            if wt.state == CANCELLED:
                # its thread still runs: count it again and keep its result
                self.executing.add(key)
                out.append(("resume", key))
            wt.state = EXECUTING
            wt.owned = True
            wt.run_id = run_id
            return self._schedule(out)
        if wt is not None and wt.state in (WAITING, READY):
            # a second assignment of something already queued: take the new run
            wt.run_id = run_id
            return self._schedule(out)
        wt = self._ensure(key, WAITING)
        if wt.state in (FETCH, FLIGHT):
            # we were fetching it as a dependency; now we run it ourselves
            if wt.state == FLIGHT:
                wt.state = WAITING  # the fetch result for it will be ignored
            wt.who_has = []
        wt.state = WAITING
        wt.run_spec = run_spec
        wt.report = report
        wt.priority = priority
        wt.run_id = run_id
        wt.owned = True
        wt.dependencies = set(who_has or ())
        wt.waiting_for = set()
        for dep, peers in (who_has or {}).items():
            dwt = self._ensure(dep, FETCH)
            if dwt.state == FETCH:
                self.to_fetch.add(dep)
            dwt.dependents.add(key)
            if dwt.state != MEMORY:
                wt.waiting_for.add(dep)
                if dwt.state != FETCH:
                    dwt.who_has = [p for p in peers if p != self.address]
                else:
                    dwt.who_has = [p for p in peers if p != self.address]
                    dwt.tried = []
                    if nbytes and dep in nbytes:
                        dwt.nbytes = nbytes[dep]
                    if not dwt.who_has:
                        out.extend(self._missing(dwt, peers))
        if wt.key in self.tasks and wt.state == WAITING and not wt.waiting_for:
            self._push_ready(wt, out)
        return self._schedule(out)

    def _missing(self, dwt, tried):
        """No peer could give us ``dwt``: drop the tasks that need it."""
        out = []
        if dwt.run_spec is None:
            dwt.owned = False  # a copy the scheduler asked for: give up on it
        for key in list(dwt.dependents):
            wt = self.tasks.get(key)
            if wt is None or wt.state not in (WAITING, READY):
                continue
            out.append(("send", {"op": "missing-data", "key": key, "run_id": wt.run_id,
                                 "missing": {dwt.key: list(tried)}}))
            self._forget_task(wt, out)
        if dwt.key in self.tasks:
            self._release_if_unneeded(dwt, out)
        return out

    def stimulus_execute_done(self, key, run_id, ok, nbytes=0, type=None,
                              exception=None, traceback=None, data=None):
        """A thread finished running ``key``.  The server stored the result
        in its data (``ok``) before calling this; ``data`` is the result
        already serialized, when small and a client waits for it."""
        self.log.append(("execute-done", key, run_id, ok))
        out = []
        self.executing.discard(key)
        wt = self.tasks.get(key)
        if wt is None:
            if ok:
                out.append(("delete", [key]))
            return self._schedule(out)
        if wt.state == CANCELLED:
            wt.owned = False
            for dep in wt.dependencies:
                dwt = self.tasks.get(dep)
                if dwt is not None:
                    dwt.dependents.discard(key)
                    self._release_if_unneeded(dwt, out)
            wt.dependencies = set()
            wt.run_spec = None
            if ok:
                wt.state = MEMORY
                wt.nbytes = nbytes
                self._data_arrived(wt, out)  # a local task may need it as a dependency
            else:
                wt.state = FETCH  # if a local task needs it, get it from a peer
                self.to_fetch.add(key)
                wt.tried = []
            self._release_if_unneeded(wt, out)
            return self._schedule(out)
        for dep in wt.dependencies:
            dwt = self.tasks.get(dep)
            if dwt is not None:
                dwt.dependents.discard(key)
                self._release_if_unneeded(dwt, out)
        wt.dependencies = set()
        wt.run_spec = None
        if ok:
            wt.state = MEMORY
            wt.nbytes = nbytes
            msg = {"op": "task-finished", "key": key, "run_id": wt.run_id,
                   "nbytes": nbytes, "type": type}
            if data is not None:
                msg["data"] = data
            out.append(("send", msg))
            self._data_arrived(wt, out)
        else:
            out.append(("send", {"op": "task-erred", "key": key, "run_id": wt.run_id,
                                 "exception": exception, "traceback": traceback}))
            wt.owned = False
            wt.state = WAITING
            self._release_if_unneeded(wt, out)
        return self._schedule(out)

    def _data_arrived(self, wt, out):
        for dkey in list(wt.dependents):
            dwt = self.tasks.get(dkey)
            if dwt is None:
                continue
            dwt.waiting_for.discard(wt.key)
            if dwt.state == WAITING and not dwt.waiting_for and dwt.run_spec is not None:
                self._push_ready(dwt, out)

    def stimulus_gather_done(self, peer, got, missing=(), failed=False):
        """A fetch from ``peer`` ended.  ``got``: key -> nbytes of the data
        the server stored; ``missing``: keys the peer did not have;
        ``failed``: the peer could not be reached at all."""
        self.log.append(("gather-done", peer, len(got), len(missing), failed))
        out = []
        asked = self.in_flight.pop(peer, set())
        replicas = []
        for key in asked:
            wt = self.tasks.get(key)
            if key in got:
                if wt is None or wt.state != FLIGHT:
                    if wt is None or wt.state != MEMORY:
                        if wt is None or not wt.dependents:
                            out.append(("delete", [key]))
                    continue
                wt.state = MEMORY
                wt.nbytes = got[key]
                if wt.owned and wt.run_spec is None:
                    replicas.append(key)
                self._data_arrived(wt, out)
                self._release_if_unneeded(wt, out)
                continue
            if wt is None or wt.state != FLIGHT:
                continue
            wt.tried.append(peer)
            wt.state = FETCH
            self.to_fetch.add(key)
            if not [p for p in wt.who_has if p not in wt.tried]:
                out.extend(self._missing(wt, wt.tried))
        if replicas:
            out.append(("send", {"op": "add-keys", "keys": replicas}))
        return self._schedule(out)

    def stimulus_acquire_replicas(self, who_has, nbytes=None):
        """The scheduler wants copies of these keys here too (workers are
        dying, so a result held once is at risk, or a client asked for
        ``replicate``).  ``who_has``: key -> peers.
        A copy is owned, like a result computed here, and reported with
        ``add-keys`` once it has arrived."""
        self.log.append(("acquire-replicas", len(who_has)))
        out = []
        have = []
        for key, peers in who_has.items():
            wt = self.tasks.get(key)
            if wt is None:
                peers = [p for p in peers if p != self.address]
                if not peers:
                    continue
                wt = self._ensure(key, FETCH)
                wt.who_has = peers
                wt.tried = []
                if nbytes and key in nbytes:
                    wt.nbytes = nbytes[key]
                self.to_fetch.add(key)
                wt.owned = True
            elif wt.run_spec is None and not wt.owned:
                if wt.state == MEMORY:
                    have.append(key)
                wt.owned = True  # a copy fetched for a local task: keep it
        if have:
            out.append(("send", {"op": "add-keys", "keys": have}))
        return self._schedule(out)

    def stimulus_peer_removed(self, peer):
        """The scheduler removed ``peer`` (it died or hung): fetch nothing
        more from it.  Fetches in flight from it are cut by the server and
        end with ``stimulus_gather_done(peer, {}, failed=True)``."""
        self.log.append(("peer-removed", peer))
        out = []
        for wt in list(self.tasks.values()):
            if wt.state == FETCH and peer in wt.who_has and peer not in wt.tried:
                wt.tried.append(peer)
                if not [p for p in wt.who_has if p not in wt.tried]:
                    out.extend(self._missing(wt, wt.tried))
        return self._schedule(out)

    def stimulus_free_keys(self, keys, run_id=None):
        """The scheduler does not want these keys here any more."""
        self.log.append(("free-keys", len(keys), run_id))
        out = []
        for key in keys:
            wt = self.tasks.get(key)
            if wt is None:
                continue
            if run_id is not None and wt.run_id != run_id:
                continue
            if wt.state == EXECUTING:
                self._abandon(wt, out)
                continue
            if wt.state in (WAITING, READY):
                wt.state = WAITING
                self._forget_task(wt, out)
                continue
            wt.owned = False
            self._release_if_unneeded(wt, out)
        return self._schedule(out)

    def _abandon(self, wt, out):
        """Nobody wants the running ``wt`` any more.  A Python thread cannot
        be stopped, so the run goes on in the background but stops counting
        against ``nthreads``: new work gets a thread at once."""
        wt.state = CANCELLED
        wt.owned = False
        self.executing.discard(wt.key)
        out.append(("abandon", wt.key))

    def stimulus_pause(self, paused: bool):
        self.paused = paused
        return self._schedule([])

    def stimulus_clear(self):
        """Forget everything (the scheduler restarted)."""
        out = [("delete", [k for k, wt in self.tasks.items() if wt.state == MEMORY])]
        for wt in list(self.tasks.values()):
            if wt.state == EXECUTING:
                self._abandon(wt, out)
        self.tasks = {k: wt for k, wt in self.tasks.items() if wt.state == CANCELLED}
        for wt in self.tasks.values():
            wt.owned = False
            wt.dependencies = set()
            wt.dependents = set()
        self.ready = []
        self.in_flight = {}
        self.to_fetch = set()
        return out

    # ------------------------------------------------------------ validation
    def validate_state(self):
        for key, wt in self.tasks.items():
            assert wt.key == key
            if wt.state == READY:
                assert not wt.waiting_for, wt
            if wt.state == WAITING and wt.run_spec is not None:
                assert wt.waiting_for, wt
                for dep in wt.waiting_for:
                    assert self.tasks[dep].state in (FETCH, FLIGHT, WAITING, READY, EXECUTING), (wt, dep)
            if wt.state == EXECUTING:
                assert key in self.executing, wt
            for dep in wt.dependencies:
                assert key in self.tasks[dep].dependents, (wt, dep)
        for key in self.executing:
            assert self.tasks[key].state == EXECUTING, key
        # a resumed cancelled run may take executing one past nthreads + prefetch
