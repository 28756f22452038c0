"""The scheduler's state machine: everything that decides lives here.

Rules of this module:

* No I/O, no clocks, no threads.  Stimuli (``stimulus_*`` methods) are the
  only mutators.  Each one returns the messages to send, as
  ``(to_workers, to_clients)``: dicts from worker address / client id to a
  list of message dicts.  The server (:mod:`distributed.scheduler`) sends
  them; tests read them.
* Every change of a task's state goes through :meth:`SchedulerState._transition`,
  which looks the ``(start, finish)`` pair up in one table and raises on a
  pair that is not there.  Transition methods return *recommendations*
  (``{TaskState: new_state}``) which :meth:`_transitions` follows until none
  remain.
* User data never appears here: a task's ``run_spec``, a result's exception
  are opaque values that are only forwarded.

Theory of operation.  A client's ``update-graph`` adds tasks (with their
dependencies) and says which keys it wants.  A wanted task goes ``released ->
waiting``; a waiting task whose dependencies are all in memory goes to
``processing`` on the worker chosen by :func:`decide_worker` (or to
``no-worker`` if no worker may run it).  The worker answers with
``task-finished`` (``memory``) or ``task-erred`` (``erred``, which spreads to
every dependent).  Each assignment carries a fresh ``run_id``; a report whose
run_id or worker does not match the current assignment is stale and ignored.

Data is held as long as a client wants the key or a dependent that is still
to run needs it (``waiters``).  When neither holds, the data is freed
(``memory -> released``) and, once no dependent is left either, the task is
forgotten.  A released task keeps its ``run_spec`` while dependents exist, so
that a lost result can be recomputed from the graph.

When a worker leaves, its running tasks go back to ``waiting``; keys whose
only copy it held are recomputed if still needed.  A task that was running on
``allowed_failures + 1`` workers that died errs with ``KilledWorker``.

State (all of it):

* ``tasks``: key -> :class:`TaskState`
* ``workers``: address -> :class:`WorkerState`
* ``clients``: client id -> :class:`ClientState`
* ``unrunnable``: set of TaskStates in ``no-worker`` (ready, but no worker may
  run them)
* ``queued``: heap of ``(priority, counter, TaskState)``: ready tasks without
  dependencies or restrictions, which wait for a worker with fewer than
  ``saturation * nthreads`` tasks (entries whose task left ``queued`` are
  skipped when popped).  Every such task passes through it, so that they go
  out in priority order.
* ``generation``: count of ``update-graph`` calls, the second element of task
  priorities (earlier submissions run first)
* ``log``: bounded deque of the last stimuli, for debugging
* ``replicate_nbytes``: while > 0, each result of at most this many bytes
  that is still needed is kept on two workers: a second copy is asked for
  when it finishes, and again for those left with one copy when a worker is
  removed (the server turns this on while workers are dying)
"""
from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Set

RELEASED = "released"
WAITING = "waiting"
NO_WORKER = "no-worker"
QUEUED = "queued"
PROCESSING = "processing"
MEMORY = "memory"
ERRED = "erred"
FORGOTTEN = "forgotten"

ALL_STATES = (RELEASED, WAITING, NO_WORKER, QUEUED, PROCESSING, MEMORY, ERRED, FORGOTTEN)

#: A worker is sent at most this many tasks without dependencies per thread;
#: the rest wait in the scheduler's queue (state ``queued``) and go to
#: whichever worker frees a slot first, so a worker that joins (or comes back
#: after a crash) gets work at once.  Refilling costs messages: measured with
#: ../shared/bench on two single-thread workers, a 10k-task map ran at 4,400
#: tasks/s with 8, 8,500 with 32, 9,200 with 64 and 10,000 with no limit; a
#: 21k-task dask.array graph at 2,050, 3,260, 3,190 and 3,230.
SATURATION = 32


class InvalidTransition(Exception):
    pass


class _EmptySet(frozenset):
    """The shared empty value of a TaskState's set attributes.

    An empty ``set`` costs 216 bytes and most tasks leave most of theirs
    empty, so each attribute starts as this one immutable empty set and is
    replaced by a :class:`_One` on the first ``add`` (see :func:`_added`).
    ``discard`` is a no-op so that removal needs no special case.
    """

    __slots__ = ()

    def discard(self, item):
        pass


EMPTY = _EmptySet()

_VACANT = object()


class _One(Set):
    """A mutable set of at most one item: 40 bytes instead of a set's 216.

    Most tasks have one dependency, one client that wants them, one worker
    that holds them.  :func:`_added` turns EMPTY into a ``_One`` and a full
    ``_One`` into a real ``set``; ``discard`` empties it in place.  Items are
    TaskState/WorkerState/ClientState objects, equal only to themselves.
    """

    __slots__ = ("item",)

    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 0 if self.item is _VACANT else 1

    def __iter__(self):
        if self.item is not _VACANT:
            yield self.item

    def __contains__(self, x):
        return self.item is x

    def discard(self, x):
        if self.item is x:
            self.item = _VACANT

    def __repr__(self):
        return "{%r}" % (self.item,) if self.item is not _VACANT else "set()"


def _added(current, item):
    """``current`` with ``item`` added (a new container when it must grow)."""
    if current is EMPTY:
        return _One(item)
    if type(current) is _One:
        if current.item is _VACANT:
            current.item = item
            return current
        if current.item is item:
            return current
        return {current.item, item}
    current.add(item)
    return current


class TaskState:
    """One task as the scheduler sees it.

    * ``dependencies`` / ``dependents``: sets of TaskState (the graph)
    * ``waiting_on``: dependencies not yet in memory (while ``waiting``)
    * ``waiters``: dependents that still need this task's data
    * ``who_has``: set of WorkerState holding the data (``memory``)
    * ``processing_on``: the WorkerState running it (``processing``)
    * ``who_wants``: set of ClientState holding futures to it
    * ``run_id``: increments with every assignment to a worker
    * ``suspicious``: how many workers died while running it, or while holding
      its only copy as the last result they finished
    * ``exception``, ``traceback``, ``exception_blame``: set while ``erred``
      (``exception_blame`` is the task that really failed)
    """

    __slots__ = (
        "key", "state", "run_spec", "priority", "dependencies", "dependents",
        "waiting_on", "waiters", "who_has", "processing_on", "who_wants",
        "nbytes", "type", "exception", "traceback", "exception_blame", "run_id",
        "suspicious", "restrictions", "retries",
    )

    def __init__(self, key, run_spec=None, priority=(0,)):
        self.key = key
        self.state = RELEASED
        self.run_spec = run_spec
        self.priority = priority
        self.dependencies = EMPTY
        self.dependents = EMPTY
        self.waiting_on = EMPTY
        self.waiters = EMPTY
        self.who_has = EMPTY
        self.processing_on = None
        self.who_wants = EMPTY
        self.nbytes = -1
        self.type = None
        self.exception = None
        self.traceback = None
        self.exception_blame = None
        self.run_id = 0
        self.suspicious = 0
        self.restrictions = None
        self.retries = 0

    def __repr__(self):
        return "<Task %r %s>" % (self.key, self.state)


class WorkerState:
    """One worker: ``processing`` (TaskStates assigned), ``has_what``
    (TaskStates whose data it holds), ``nbytes`` (sum of their sizes)."""

    __slots__ = ("address", "nthreads", "name", "nanny", "processing", "has_what",
                 "nbytes", "last_seen", "memory_limit", "paused", "last_finished")

    def __init__(self, address, nthreads=1, name=None, nanny=None, memory_limit=0, now=0.0):
        self.address = address
        self.nthreads = nthreads
        self.name = address if name is None else name
        self.nanny = nanny
        self.processing = set()
        self.has_what = set()
        self.nbytes = 0
        self.last_seen = now
        self.memory_limit = memory_limit
        self.paused = False
        self.last_finished = None  # the TaskState it finished most recently

    def __repr__(self):
        return "<Worker %s: %d processing, %d in memory>" % (
            self.address, len(self.processing), len(self.has_what))

    @property
    def host(self):
        return self.address.rsplit(":", 1)[0].split("://")[-1]


class ClientState:
    __slots__ = ("id", "wants_what")

    def __init__(self, client_id):
        self.id = client_id
        self.wants_what = set()

    def __repr__(self):
        return "<Client %s: wants %d>" % (self.id, len(self.wants_what))


def decide_worker(ts, workers, valid=None):
    """The worker that needs the fewest bytes moved to run ``ts``.

    Ties go to the least busy worker (tasks processing per thread), then to
    the one with the least data.  ``valid`` restricts the choice; ``None``
    means any worker.  Returns None if no worker may run it.

    >>> alice, bob = WorkerState('alice'), WorkerState('bob')
    >>> x, y = TaskState('x'), TaskState('y')
    >>> x.nbytes, y.nbytes = 1000, 10
    >>> x.who_has, y.who_has = {alice}, {bob}
    >>> z = TaskState('z'); z.dependencies = {x, y}
    >>> decide_worker(z, [alice, bob]).name     # moving y is cheaper
    'alice'
    >>> decide_worker(z, [alice, bob], valid={bob}).name
    'bob'
    >>> bob.processing = {TaskState('a')}
    >>> decide_worker(TaskState('w'), [alice, bob]).name   # no data: least busy
    'alice'
    """
    if valid is not None:
        candidates = [ws for ws in workers if ws in valid]
    else:
        candidates = workers
    if not candidates:
        return None
    deps = ts.dependencies
    if deps:
        holders = set()
        for dts in deps:
            holders.update(dts.who_has)
        if valid is not None:
            holders &= valid
        if holders:
            candidates = holders

        def cost(ws):
            moved = 0
            for dts in deps:
                if ws not in dts.who_has:
                    moved += max(dts.nbytes, 0)
            return (moved, len(ws.processing) / ws.nthreads, ws.nbytes)
    else:
        def cost(ws):
            return (len(ws.processing) / ws.nthreads, ws.nbytes)
    return min(candidates, key=cost)


class _Loose(list):
    """Restrictions that are only a preference (``allow_other_workers``):
    any worker may run the task while none of these is connected."""

    __slots__ = ()


def _priority(ts):
    return ts.priority


class SchedulerState:
    """All scheduling decisions.  See the module docstring."""

    def __init__(self, allowed_failures: int = 3, validate: bool = False, log_length: int = 10000,
                 saturation: int = SATURATION):
        self.tasks = {}
        self.workers = {}
        self.clients = {}
        self.unrunnable = set()
        self.queued = []
        self.saturation = saturation
        self._queue_counter = 0
        self.generation = 0
        self._run_ids = 0
        self.allowed_failures = allowed_failures
        self.validate = validate
        self.log = deque(maxlen=log_length)
        self.replicate_nbytes = 0
        self._to_workers = defaultdict(list)
        self._to_clients = defaultdict(list)
        self._workers_by_host = defaultdict(set)
        self.transitions_table = {
            (RELEASED, WAITING): self._transition_released_waiting,
            (RELEASED, FORGOTTEN): self._transition_released_forgotten,
            (WAITING, PROCESSING): self._transition_waiting_processing,
            (WAITING, RELEASED): self._transition_waiting_released,
            (WAITING, ERRED): self._transition_waiting_erred,
            (NO_WORKER, WAITING): self._transition_no_worker_waiting,
            (NO_WORKER, RELEASED): self._transition_no_worker_released,
            (NO_WORKER, ERRED): self._transition_waiting_erred,
            (QUEUED, PROCESSING): self._transition_queued_processing,
            (QUEUED, RELEASED): self._transition_queued_released,
            (PROCESSING, MEMORY): self._transition_processing_memory,
            (PROCESSING, RELEASED): self._transition_processing_released,
            (PROCESSING, ERRED): self._transition_processing_erred,
            (MEMORY, RELEASED): self._transition_memory_released,
            (ERRED, RELEASED): self._transition_erred_released,
            (ERRED, FORGOTTEN): self._transition_erred_forgotten,
        }

    # ------------------------------------------------------------ plumbing
    def _flush(self):
        out = (dict(self._to_workers), dict(self._to_clients))
        self._to_workers.clear()
        self._to_clients.clear()
        return out

    def _report(self, ts, msg):
        """Send ``msg`` to every client that wants ``ts``."""
        for cs in ts.who_wants:
            self._to_clients[cs.id].append(msg)

    def _transition(self, ts, finish, **kwargs):
        start = ts.state
        if start == finish:
            return {}
        func = self.transitions_table.get((start, finish))
        if func is None:
            raise InvalidTransition("%r: %s -> %s" % (ts.key, start, finish))
        recs = func(ts, **kwargs)
        self.log.append((ts.key, start, ts.state))
        return recs

    def _transitions(self, recs):
        """Follow recommendations until none are left."""
        while recs:
            ts, finish = recs.popitem()
            if ts.state == FORGOTTEN:
                continue
            if finish == RELEASED and self._needed(ts):
                continue  # needed again since the recommendation was made
            if finish == FORGOTTEN and (ts.who_wants or ts.dependents):
                continue  # referenced again since the recommendation was made
            new = self._transition(ts, finish)
            recs.update(new)
        if self.queued:
            self._fill_slots()
        if self.validate:
            self.validate_state()

    def _needed(self, ts) -> bool:
        return bool(ts.who_wants or ts.waiters)

    # ------------------------------------------------------------ transitions
    def _transition_released_waiting(self, ts):
        recs = {}
        ts.waiting_on = EMPTY
        for dts in ts.dependencies:
            if dts.state == ERRED:
                ts.state = WAITING
                recs[ts] = ERRED
                return recs
            dts.waiters = _added(dts.waiters, ts)
            if dts.state != MEMORY:
                ts.waiting_on = _added(ts.waiting_on, dts)
                if dts.state == RELEASED:
                    recs[dts] = WAITING
        ts.state = WAITING
        if not ts.waiting_on:
            recs[ts] = PROCESSING
        return recs

    def _transition_waiting_processing(self, ts):
        if not ts.dependencies and ts.restrictions is None:
            # through the queue, so that they go out in priority order when
            # there are more than the workers' slots; _fill_slots picks the
            # worker, so decide_worker is not needed here
            if any(not ws.paused for ws in self.workers.values()):
                ts.state = QUEUED
                self._queue_counter += 1
                heapq.heappush(self.queued, (ts.priority, self._queue_counter, ts))
                return {}
            ws = None
        else:
            workers = [ws for ws in self.workers.values() if not ws.paused]
            ws = decide_worker(ts, workers, self._valid_workers(ts))
        if ws is None:
            ts.state = NO_WORKER
            self.unrunnable.add(ts)
            return {}
        self._assign(ts, ws)
        return {}

    def _fill_slots(self):
        """Assign queued tasks, highest priority first, each to the least
        busy worker with room, until the queue or the room runs out."""
        rooms = []
        for ws in self.workers.values():
            if not ws.paused and len(ws.processing) < self.saturation * ws.nthreads:
                rooms.append((len(ws.processing) / ws.nthreads, ws.address, ws))
        heapq.heapify(rooms)
        queue = self.queued
        while queue and rooms:
            ts = heapq.heappop(queue)[2]
            if ts.state != QUEUED:
                continue  # released while queued
            ws = rooms[0][2]
            self._transition(ts, PROCESSING, ws=ws)
            if len(ws.processing) < self.saturation * ws.nthreads:
                heapq.heapreplace(rooms, (len(ws.processing) / ws.nthreads, ws.address, ws))
            else:
                heapq.heappop(rooms)

    def _transition_queued_processing(self, ts, ws=None):
        self._assign(ts, ws)
        return {}

    def _transition_queued_released(self, ts):
        ts.state = WAITING  # its heap entry is skipped when popped
        return self._transition_waiting_released(ts)

    def _assign(self, ts, ws):
        ts.state = PROCESSING
        ts.processing_on = ws
        self._run_ids += 1
        ts.run_id = self._run_ids
        ws.processing.add(ts)
        who_has = {}
        nbytes = {}
        for dts in ts.dependencies:
            who_has[dts.key] = [w.address for w in dts.who_has]
            nbytes[dts.key] = dts.nbytes
        self._to_workers[ws.address].append({
            "op": "compute-task", "key": ts.key, "run_spec": ts.run_spec,
            "priority": ts.priority, "run_id": ts.run_id,
            "who_has": who_has, "nbytes": nbytes,
            # a client waits for it: send small results along (saves a fetch)
            "report": bool(ts.who_wants),
        })

    def _valid_workers(self, ts):
        if ts.restrictions is None:
            return None
        valid = set()
        for r in ts.restrictions:
            ws = self.workers.get(r)
            if ws is not None:
                valid.add(ws)
                continue
            for ws in self.workers.values():
                if ws.name == r or ws.host == r:
                    valid.add(ws)
        if not valid and type(ts.restrictions) is _Loose:
            return None
        return valid

    def _transition_waiting_released(self, ts):
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
        ts.waiting_on = EMPTY
        ts.state = RELEASED
        recs = {}
        for dts in ts.dependencies:
            if not self._needed(dts) and dts.state != RELEASED:
                recs[dts] = RELEASED
        if not ts.who_wants and not ts.dependents:
            recs[ts] = FORGOTTEN
        elif self._needed(ts):
            recs[ts] = WAITING
        return recs

    def _transition_no_worker_waiting(self, ts):
        self.unrunnable.discard(ts)
        ts.state = WAITING
        return {ts: PROCESSING}

    def _transition_no_worker_released(self, ts):
        self.unrunnable.discard(ts)
        ts.state = WAITING
        return self._transition_waiting_released(ts)

    def _transition_processing_memory(self, ts, worker=None, nbytes=-1, type=None, data=None):
        ws = ts.processing_on
        ws.processing.discard(ts)
        ts.processing_on = None
        ts.state = MEMORY
        ts.nbytes = nbytes
        ts.type = type
        # A result whose worker then dies may be what killed it (a task
        # whose output exceeds the memory limit), so its suspicion is
        # forgiven only once the same worker finishes another task.
        if ws.last_finished is not None:
            ws.last_finished.suspicious = 0
        ws.last_finished = ts
        self._add_replica(ts, ws)
        recs = {}
        for dts in ts.waiters:
            dts.waiting_on.discard(ts)
            if dts.state == WAITING and not dts.waiting_on:
                recs[dts] = PROCESSING
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
            if not self._needed(dts) and dts.state == MEMORY:
                recs[dts] = RELEASED
        if self.replicate_nbytes and 0 <= nbytes <= self.replicate_nbytes and self._needed(ts):
            self._replicate([ts])
        if ts.who_wants:
            msg = {"op": "key-in-memory", "key": ts.key, "nbytes": nbytes,
                   "type": type, "workers": [ws.address]}
            if data is not None:
                msg["data"] = data  # forwarded, never kept or unpickled here
            self._report(ts, msg)
        elif not ts.waiters:
            recs[ts] = RELEASED
        return recs

    def _replicate(self, tss, n=2):
        """Ask other workers for copies of each of ``tss`` (all in memory
        somewhere) until it is on ``n`` workers (None: on every worker).

        Each copy goes to the least busy worker that lacks it, counting the
        copies already planned here; one message per worker.  A copy counts
        once the worker reports it (``add-keys``).  Used while workers are
        dying (``replicate_nbytes``: then a lost worker costs only the tasks
        it was running, not every result it held and, through them, the
        inputs those needed) and for ``Executor.replicate``.
        """
        planned = defaultdict(int)
        orders = {}
        for ts in tss:
            want = len(self.workers) if n is None else n
            lacking = [ws for ws in self.workers.values()
                       if ws not in ts.who_has and not ws.paused]
            lacking.sort(key=lambda ws: len(ws.processing) + planned[ws])
            for ws in lacking[:max(want - len(ts.who_has), 0)]:
                planned[ws] += 1
                msg = orders.get(ws)
                if msg is None:
                    msg = orders[ws] = {"op": "acquire-replicas", "who_has": {}, "nbytes": {}}
                    self._to_workers[ws.address].append(msg)
                msg["who_has"][ts.key] = [w.address for w in ts.who_has]
                msg["nbytes"][ts.key] = ts.nbytes

    def _add_replica(self, ts, ws):
        if ws not in ts.who_has:
            ts.who_has = _added(ts.who_has, ws)
            ws.has_what.add(ts)
            ws.nbytes += max(ts.nbytes, 0)

    def _remove_replica(self, ts, ws):
        if ws in ts.who_has:
            ts.who_has.discard(ws)
            ws.has_what.discard(ts)
            ws.nbytes -= max(ts.nbytes, 0)

    def _transition_processing_released(self, ts):
        ws = ts.processing_on
        if ws is not None:
            ws.processing.discard(ts)
            if ws.address in self.workers:
                self._to_workers[ws.address].append({"op": "free-keys", "keys": [ts.key]})
        ts.processing_on = None
        ts.state = WAITING
        return self._transition_waiting_released(ts)

    def _transition_processing_erred(self, ts, exception=None, traceback=None, blame=None):
        ws = ts.processing_on
        if ws is not None:
            ws.processing.discard(ts)
        ts.processing_on = None
        ts.state = WAITING
        return self._transition_waiting_erred(ts, exception, traceback, blame)

    def _transition_waiting_erred(self, ts, exception=None, traceback=None, blame=None):
        self.unrunnable.discard(ts)
        if blame is None:
            for dts in ts.dependencies:
                if dts.state == ERRED:
                    blame = dts.exception_blame
                    exception, traceback = dts.exception, dts.traceback
                    break
        ts.exception = exception
        ts.traceback = traceback
        ts.exception_blame = blame if blame is not None else ts
        recs = {}
        for dts in ts.dependencies:
            dts.waiters.discard(ts)
            if not self._needed(dts) and dts.state == MEMORY:
                recs[dts] = RELEASED
        ts.waiting_on = EMPTY
        ts.state = ERRED
        for dts in ts.dependents:
            if dts.state in (WAITING, NO_WORKER, PROCESSING):
                recs[dts] = ERRED
        self._report(ts, {"op": "task-erred", "key": ts.key, "exception": ts.exception,
                          "traceback": ts.traceback})
        if not ts.who_wants and not ts.dependents:
            recs[ts] = FORGOTTEN
        return recs

    def _transition_memory_released(self, ts, lost=False):
        for ws in list(ts.who_has):
            self._remove_replica(ts, ws)
            if not lost and ws.address in self.workers:
                self._to_workers[ws.address].append({"op": "free-keys", "keys": [ts.key]})
        ts.state = RELEASED
        recs = {}
        for dts in list(ts.waiters):
            if dts.state in (WAITING, NO_WORKER):
                dts.waiting_on = _added(dts.waiting_on, ts)
            elif dts.state == PROCESSING:
                # its worker may not have fetched the data yet: run it again
                # once the data is back
                recs.update(self._transition_processing_released(dts))
        if self._needed(ts):
            self._report(ts, {"op": "lost-data", "key": ts.key})
            recs[ts] = WAITING
        elif not ts.dependents:
            recs[ts] = FORGOTTEN
        return recs

    def _transition_erred_released(self, ts):
        ts.exception = ts.traceback = ts.exception_blame = None
        ts.state = RELEASED
        recs = {}
        for dts in ts.dependents:
            if dts.state == ERRED:
                recs[dts] = RELEASED
        if self._needed(ts):
            recs[ts] = WAITING
        elif not ts.dependents:
            recs[ts] = FORGOTTEN
        return recs

    def _transition_erred_forgotten(self, ts):
        ts.exception = ts.traceback = ts.exception_blame = None
        ts.state = RELEASED
        return self._transition_released_forgotten(ts)

    def _transition_released_forgotten(self, ts):
        if ts.who_wants or ts.dependents:
            return {}  # still referenced: stays released
        ts.state = FORGOTTEN
        del self.tasks[ts.key]
        recs = {}
        for dts in ts.dependencies:
            dts.dependents.discard(ts)
            dts.waiters.discard(ts)
            if not dts.dependents and not dts.who_wants:
                if dts.state in (RELEASED, ERRED):
                    recs[dts] = FORGOTTEN
                elif dts.state == MEMORY and not dts.waiters:
                    recs[dts] = RELEASED
                elif dts.state in (WAITING, NO_WORKER, QUEUED, PROCESSING):
                    recs[dts] = RELEASED
        ts.dependencies = EMPTY
        return recs

    # ------------------------------------------------------------ stimuli: clients
    def stimulus_add_client(self, client):
        self.log.append(("add-client", client))
        if client not in self.clients:
            self.clients[client] = ClientState(client)
        return self._flush()

    def stimulus_remove_client(self, client):
        """The client left: release everything only it wanted."""
        self.log.append(("remove-client", client))
        cs = self.clients.pop(client, None)
        if cs is not None:
            self._release_wants(cs, list(cs.wants_what))
        self._to_clients.pop(client, None)
        return self._flush()

    def stimulus_update_graph(self, client, tasks, dependencies, keys, priority=None,
                              user_priority=0, restrictions=None, retries=None,
                              loose_restrictions=()):
        """Add tasks and say which keys ``client`` wants.

        * ``tasks``: key -> run_spec (opaque)
        * ``dependencies``: key -> list of keys it needs (which may be keys
          the scheduler already holds)
        * ``keys``: the keys the client holds futures for
        * ``priority``: key -> number (lower first, e.g. ``dask.order``)
        * ``restrictions``: key -> list of worker addresses, names or hosts
        * ``loose_restrictions``: keys whose restrictions are a preference:
          any worker may run them while none of those is connected
        * ``retries``: key -> how many times to re-run it after an error
        """
        self.log.append(("update-graph", client, len(tasks)))
        self.generation += 1
        cs = self.clients.get(client)
        if cs is None:
            cs = self.clients[client] = ClientState(client)
        priority = priority or {}
        restrictions = restrictions or {}
        retries = retries or {}
        missing = []
        new = []
        for key, run_spec in tasks.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(
                    key, run_spec, (-user_priority, self.generation, priority.get(key, 0)))
                new.append(ts)
            elif ts.state == RELEASED and ts.run_spec is None:
                ts.run_spec = run_spec
            else:
                continue
            if key in restrictions:
                ts.restrictions = (_Loose if key in loose_restrictions else list)(
                    restrictions[key])
            if key in retries:
                ts.retries = retries[key]
        for ts in new:
            for dep in dependencies.get(ts.key, ()):
                dts = self.tasks.get(dep)
                if dts is None:
                    missing.append((ts.key, dep))
                    continue
                ts.dependencies = _added(ts.dependencies, dts)
                dts.dependents = _added(dts.dependents, ts)
        recs = {}
        if missing:
            # a dependency nobody can produce: err the dependents at once
            for key, dep in missing:
                ts = self.tasks[key]
                ts.state = WAITING
                recs.update(self._transition_waiting_erred(ts, exception={
                    "type": "ValueError",
                    "text": "Missing dependency %r of %r: it is not in the graph and "
                            "not held by the cluster" % (dep, key)}))
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            if ts not in cs.wants_what:
                cs.wants_what.add(ts)
                ts.who_wants = _added(ts.who_wants, cs)
            self._report_current(ts, cs)
            if ts.state == RELEASED:
                recs[ts] = WAITING
        self._transitions(recs)
        return self._flush()

    def _report_current(self, ts, cs):
        """Tell a client that (newly) wants ``ts`` where it stands."""
        if ts.state == MEMORY:
            self._to_clients[cs.id].append({
                "op": "key-in-memory", "key": ts.key, "nbytes": ts.nbytes, "type": ts.type,
                "workers": [ws.address for ws in ts.who_has]})
        elif ts.state == ERRED:
            self._to_clients[cs.id].append({
                "op": "task-erred", "key": ts.key, "exception": ts.exception,
                "traceback": ts.traceback})

    def stimulus_client_desires_keys(self, client, keys):
        """The client holds futures for ``keys`` again (keys already known)."""
        cs = self.clients.get(client) or self.clients.setdefault(client, ClientState(client))
        recs = {}
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                self._to_clients[client].append({"op": "cancelled-keys", "keys": [key]})
                continue
            if ts not in cs.wants_what:
                cs.wants_what.add(ts)
                ts.who_wants = _added(ts.who_wants, cs)
            self._report_current(ts, cs)
            if ts.state == RELEASED:
                recs[ts] = WAITING
        self._transitions(recs)
        return self._flush()

    def stimulus_client_releases_keys(self, client, keys):
        self.log.append(("client-releases-keys", client, len(keys)))
        cs = self.clients.get(client)
        if cs is not None:
            tss = [self.tasks[k] for k in keys if k in self.tasks]
            self._release_wants(cs, tss)
        return self._flush()

    def stimulus_cancel_keys(self, client, keys):
        """Like releasing, and the client is told the keys are cancelled."""
        self._to_clients[client].append({"op": "cancelled-keys", "keys": list(keys)})
        return self.stimulus_client_releases_keys(client, keys)

    def _release_wants(self, cs, tss):
        recs = {}
        for ts in tss:
            if ts not in cs.wants_what:
                continue
            cs.wants_what.discard(ts)
            ts.who_wants.discard(cs)
            if ts.who_wants:
                continue
            if ts.state == ERRED:
                # a failed key nobody wants is dropped, so that re-submitting
                # the same call runs it again (cases/14)
                if not ts.dependents:
                    recs[ts] = FORGOTTEN
                elif not any(d.who_wants for d in ts.dependents):
                    recs[ts] = RELEASED
            elif not ts.waiters:
                if ts.state in (MEMORY, WAITING, NO_WORKER, QUEUED, PROCESSING):
                    recs[ts] = RELEASED
                elif ts.state == RELEASED and not ts.dependents:
                    recs[ts] = FORGOTTEN
        self._transitions(recs)

    # ------------------------------------------------------------ stimuli: workers
    def stimulus_add_worker(self, address, nthreads=1, name=None, nanny=None,
                            memory_limit=0, now=0.0, keys=None):
        self.log.append(("add-worker", address))
        if address in self.workers:
            return self._flush()
        ws = WorkerState(address, nthreads, name, nanny, memory_limit, now)
        self.workers[address] = ws
        # keys the worker already holds (it re-registers after a scheduler restart)
        stale = []
        for key, nbytes in (keys or {}).items():
            ts = self.tasks.get(key)
            if ts is not None and ts.state == MEMORY:
                self._add_replica(ts, ws)
            else:
                stale.append(key)
        if stale:
            self._to_workers[address].append({"op": "free-keys", "keys": stale})
        recs = {ts: WAITING for ts in self.unrunnable}
        self._transitions(recs)
        return self._flush()

    def stimulus_remove_worker(self, address):
        """The worker is gone (its connection dropped or it stopped answering)."""
        self.log.append(("remove-worker", address))
        ws = self.workers.pop(address, None)
        if ws is None:
            return self._flush()
        self._to_workers.pop(address, None)
        recs = {}
        # Only the tasks it was probably running are suspects: a worker runs
        # its ready tasks in priority order, a thread each plus one queued.
        # Counting every task assigned to it would turn a few unrelated
        # deaths into KilledWorker for thousands of innocent queued tasks.
        suspects = set(heapq.nsmallest(ws.nthreads + 1, ws.processing, key=_priority))
        for ts in list(ws.processing):
            if ts in suspects:
                ts.suspicious += 1
            ws.processing.discard(ts)
            ts.processing_on = None
            if ts.suspicious > self.allowed_failures:
                ts.state = WAITING
                recs.update(self._transition_waiting_erred(ts, exception={
                    "type": "KilledWorker",
                    "text": "task %r was running on %d workers that died (the last was %s)"
                            % (ts.key, ts.suspicious, address)}))
            else:
                ts.state = WAITING
                recs.update(self._transition_waiting_released(ts))
        for ts in list(ws.has_what):
            self._remove_replica(ts, ws)
            if not ts.who_has and ts.state == MEMORY:
                recs.update(self._transition_memory_released(ts, lost=True))
                if ts is ws.last_finished:
                    ts.suspicious += 1
                    if ts.suspicious > self.allowed_failures:
                        recs.pop(ts, None)
                        ts.state = WAITING
                        recs.update(self._transition_waiting_erred(ts, exception={
                            "type": "KilledWorker",
                            "text": "task %r: the %d workers that held its result last died "
                                    "(the last was %s)" % (ts.key, ts.suspicious, address)}))
        self._transitions(recs)
        if self.replicate_nbytes:
            # back to two copies of every small result still needed, so the
            # next death (soon, while workers keep dying) loses none of them
            self._replicate([ts for ts in self.tasks.values()
                             if ts.state == MEMORY and len(ts.who_has) == 1 and self._needed(ts)
                             and 0 <= ts.nbytes <= self.replicate_nbytes])
        return self._flush()

    def stimulus_task_finished(self, key, worker, run_id, nbytes=-1, type=None, data=None):
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ws is None:
            return self._flush()
        if ts is None or ts.state != PROCESSING or ts.processing_on is not ws or ts.run_id != run_id:
            # stale: reassigned, released or forgotten meanwhile
            if ts is not None and ts.state == MEMORY and ts.run_id == run_id:
                self._add_replica(ts, ws)
            else:
                # run_id: only that run's result is dropped, not a newer one
                self._to_workers[worker].append({"op": "free-keys", "keys": [key], "run_id": run_id})
            return self._flush()
        self.log.append(("task-finished", key, worker))
        recs = self._transition(ts, MEMORY, nbytes=nbytes, type=type, data=data)
        self._transitions(recs)
        return self._flush()

    def stimulus_task_erred(self, key, worker, run_id, exception=None, traceback=None):
        ts = self.tasks.get(key)
        ws = self.workers.get(worker)
        if ts is None or ws is None or ts.state != PROCESSING or ts.processing_on is not ws \
                or ts.run_id != run_id:
            return self._flush()
        self.log.append(("task-erred", key, worker))
        if ts.retries > 0:
            ts.retries -= 1
            ws.processing.discard(ts)
            ts.processing_on = None
            ts.state = WAITING
            self._transitions({ts: PROCESSING})
            return self._flush()
        recs = self._transition(ts, ERRED, exception=exception, traceback=traceback)
        self._transitions(recs)
        return self._flush()

    def stimulus_missing_data(self, key, worker, run_id, missing):
        """The worker running ``key`` could not get ``missing`` from anyone
        the scheduler named.  Those copies are gone; run ``key`` again once
        they are back."""
        self.log.append(("missing-data", key, worker, list(missing.items())))
        recs = {}
        for dep, holders in missing.items():
            dts = self.tasks.get(dep)
            if dts is None:
                continue
            for addr in holders:
                ws = self.workers.get(addr)
                if ws is not None:
                    self._remove_replica(dts, ws)
            if dts.state == MEMORY and not dts.who_has:
                recs.update(self._transition_memory_released(dts, lost=True))
        ts = self.tasks.get(key)
        if ts is not None and ts.state == PROCESSING and ts.run_id == run_id \
                and ts.processing_on is not None and ts.processing_on.address == worker:
            recs.update(self._transition_processing_released(ts))
        self._transitions(recs)
        return self._flush()

    def stimulus_add_keys(self, worker, keys):
        """The worker holds copies of ``keys`` (fetched for its tasks)."""
        ws = self.workers.get(worker)
        if ws is None:
            return self._flush()
        stale = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == MEMORY:
                self._add_replica(ts, ws)
            else:
                stale.append(key)
        if stale:
            self._to_workers[worker].append({"op": "free-keys", "keys": stale})
        return self._flush()

    def stimulus_replicate(self, client, keys, n=None):
        """Copies of ``keys`` (those in memory) on ``n`` workers, or on every
        worker if ``n`` is None.  Only adds copies; it never removes any."""
        self.log.append(("replicate", client, len(keys), n))
        self._replicate([self.tasks[k] for k in keys
                         if k in self.tasks and self.tasks[k].state == MEMORY], n)
        return self._flush()

    def stimulus_release_worker_data(self, worker, keys):
        """The worker dropped copies of ``keys`` on its own."""
        ws = self.workers.get(worker)
        if ws is None:
            return self._flush()
        recs = {}
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            self._remove_replica(ts, ws)
            if ts.state == MEMORY and not ts.who_has:
                recs.update(self._transition_memory_released(ts, lost=True))
        self._transitions(recs)
        return self._flush()

    def stimulus_worker_paused(self, worker, paused):
        """The worker is short of memory (``paused``): send it no new tasks."""
        ws = self.workers.get(worker)
        if ws is not None:
            ws.paused = bool(paused)
            if not paused:
                self._transitions({ts: WAITING for ts in self.unrunnable})
        return self._flush()

    def stimulus_restart(self):
        """Forget every task; tell every client its futures are cancelled."""
        self.log.append(("restart",))
        for cs in self.clients.values():
            cs.wants_what = set()
            self._to_clients[cs.id].append({"op": "restart"})
        for ws in self.workers.values():
            ws.processing = set()
            ws.has_what = set()
            ws.nbytes = 0
        for ts in self.tasks.values():
            ts.state = FORGOTTEN
        self.tasks = {}
        self.unrunnable = set()
        self.queued = []
        return self._flush()

    # ------------------------------------------------------------ queries
    def who_has(self, keys=None):
        keys = self.tasks if keys is None else keys
        return {k: [ws.address for ws in self.tasks[k].who_has] if k in self.tasks else []
                for k in keys}

    def has_what(self):
        return {addr: [ts.key for ts in ws.has_what] for addr, ws in self.workers.items()}

    def processing(self):
        return {addr: [ts.key for ts in ws.processing] for addr, ws in self.workers.items()}

    # ------------------------------------------------------------ validation
    def validate_state(self):
        """Check every invariant; raise AssertionError on the first broken one."""
        for key, ts in self.tasks.items():
            assert ts.key == key
            assert ts.state in ALL_STATES and ts.state != FORGOTTEN, ts
            self.validate_task(ts)
        for ws in self.workers.values():
            for ts in ws.processing:
                assert ts.processing_on is ws, (ts, ws)
                assert ts.state == PROCESSING, ts
            for ts in ws.has_what:
                assert ws in ts.who_has, (ts, ws)
        for cs in self.clients.values():
            for ts in cs.wants_what:
                assert cs in ts.who_wants, (ts, cs)
                assert ts.key in self.tasks, ts
        for ts in self.unrunnable:
            assert ts.state == NO_WORKER, ts
        in_queue = {id(entry[2]) for entry in self.queued}
        for ts in self.tasks.values():
            if ts.state == QUEUED:
                assert id(ts) in in_queue, ts
                assert not ts.dependencies and ts.processing_on is None and not ts.who_has, ts

    def validate_task(self, ts):
        for dts in ts.dependencies:
            assert ts in dts.dependents, (ts, dts)
            assert dts.key in self.tasks, (ts, dts)
        for dts in ts.dependents:
            assert ts in dts.dependencies, (ts, dts)
        if ts.state == MEMORY:
            assert ts.who_has, ts
            assert ts.processing_on is None, ts
        if ts.state == PROCESSING:
            assert ts.processing_on is not None and ts in ts.processing_on.processing, ts
            assert all(dts.state == MEMORY for dts in ts.dependencies), ts
            assert not ts.who_has, ts
        if ts.state == WAITING:
            assert ts.waiting_on == {d for d in ts.dependencies if d.state != MEMORY}, ts
            for dts in ts.dependencies:
                assert ts in dts.waiters, (ts, dts)
        if ts.state in (RELEASED, ERRED):
            assert not ts.who_has and ts.processing_on is None, ts
        for dts in ts.waiters:
            assert dts.state in (WAITING, NO_WORKER, PROCESSING), (ts, dts)
        if ts.state == RELEASED and not ts.who_wants:
            assert ts.dependents or not self._needed(ts), ts
