"""The user-facing Executor and its Futures.

An :class:`Executor` keeps one batched stream to the scheduler and runs its
own event loop in a background thread (or, with ``asynchronous=True``, on the
caller's loop).  Blocking methods (``gather``, ``result``, ``restart``, ...)
wrap coroutine twins (``_gather``, ``_result``, ``_restart``, ...) that run
on that loop.

Reference counting.  Every :class:`Future` for a key shares one
:class:`FutureState`.  ``Executor.refcount[key]`` counts live Future objects;
when the last one is garbage collected the executor tells the scheduler
``client-releases-keys``.  ``Future.__del__`` may run in any thread, at any
moment (even inside another method of the executor), so it only appends to a
deque; the deque is drained under ``Executor._lock`` by the next method that
sends something, or on the loop soon after.  All messages to the scheduler
pass through one queue under that lock, so a release and a later
re-submission of the same key reach the scheduler in the order they
happened.

State:

* ``futures``: key -> FutureState of every key this executor holds
* ``refcount``: key -> number of live Future objects for it
* ``_graph``: :class:`~distributed.graph.HeldGraph`, what computes each key
  that a Future still needs (for ``executor.dask``)
* ``_outbox``: messages waiting to be handed to the batched stream
* ``_fetches``: worker address -> set of its get-data calls in progress
  (cancelled when the scheduler says ``worker-removed``)
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import uuid
import weakref
from collections import defaultdict, deque
from collections.abc import Iterator

from dask._task_spec import TaskRef

from .batched import BatchedSend
from .comm import CommClosedError, connect, normalize_address
from .core import ConnectionPool, RemoteError
from .graph import HeldGraph
from .future import (CANCELLED, ERROR, FINISHED, CancelledError, Future, FutureState,
                     KilledWorker, _is_iterator_like, as_completed, futures_of,
                     rebuild_exception, wait)
from .protocol import deserialize, dumps_inband, serialize
from .utils import (find_refs, funcname, register_loop_thread, sync,
                    unregister_loop_thread, LRU)

logger = logging.getLogger(__name__)

_current = []  # executors that are set as default, newest last (weakrefs)
_all_executors = weakref.WeakSet()


class Client:
    """Connect to a cluster and run computations on it.

    ``Executor('127.0.0.1:8786')`` connects to a running scheduler;
    ``Executor()`` starts a local cluster (a scheduler in this process and
    one worker process per core) and shuts it down on ``close()``, on leaving
    a ``with`` block, or at interpreter exit.

    Parameters
    ----------
    address: scheduler address (``tcp://host:port`` or ``host:port``), or None
    start: connect now (default).  With ``start=False``, ``await
        executor._start()`` from a coroutine connects on the running loop.
    asynchronous: run on the caller's event loop; use the ``_``-coroutines.
    timeout: seconds to wait for the scheduler before failing
    reconnect_timeout: seconds to keep trying to reconnect after losing the
        scheduler (existing futures err at once; new work can be submitted
        after reconnection)
    n_workers, threads_per_worker: for the local cluster (default: one
        single-thread worker per core)
    set_as_default: make this executor dask's default scheduler until closed
    """

    asynchronous = False

    def __init__(self, address=None, start=True, timeout=10.0, asynchronous=False,
                 n_workers=None, threads_per_worker=1, set_as_default=True,
                 reconnect_timeout=60.0,
                 **cluster_kwargs):
        if address is not None and not isinstance(address, str):
            if hasattr(address, "scheduler_address"):
                address = address.scheduler_address
            else:
                raise TypeError("address must be a string like 'tcp://127.0.0.1:8786', got %r"
                                % (address,))
        self.address = normalize_address(address) if address is not None else None
        self.id = "executor-" + uuid.uuid4().hex
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.asynchronous = asynchronous or not start
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.cluster_kwargs = cluster_kwargs
        self.set_as_default = set_as_default
        self.futures = {}
        self.refcount = defaultdict(int)
        self._graph = HeldGraph()
        self._fetches = defaultdict(set)  # worker -> get-data calls to it in progress
        self._cut_fetches = set()  # those cancelled because their worker was removed
        self._lock = threading.Lock()
        self._releases = deque()
        self._outbox = []
        self._flush_scheduled = False
        self._drain_scheduled = False
        self._restart_waiters = {}
        self._restart_ids = 0
        self._function_cache = LRU(100)
        self._token_cache = LRU(100)
        self.cluster = None
        self.loop = None
        self._thread = None
        self.batched = None
        self.scheduler_comm = None
        self.pool = None
        self.status = "newly-created"
        self._stream_task = None
        _all_executors.add(self)
        if start and not asynchronous:
            self._start_sync()

    # ------------------------------------------------------------ life cycle
    def _start_sync(self):
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self.loop)
            register_loop_thread(self.loop)
            ready.set()
            try:
                self.loop.run_forever()
            finally:
                unregister_loop_thread(self.loop)

        self._thread = threading.Thread(target=run, daemon=True, name="dask-executor-loop")
        self._thread.start()
        ready.wait()
        try:
            # a local cluster needs time to start its worker processes
            timeout = self.timeout + (120 if self.address is None else 5)
            self._sync(self._start, timeout=timeout)
        except BaseException:
            self._stop_loop()
            raise

    def __await__(self):
        return self._start().__await__()

    async def _start(self):
        """Connect (starting a local cluster first if no address was given)."""
        if self.status == "running":
            return self
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self.pool = ConnectionPool(limit=128, timeout=self.timeout)
        self.status = "connecting"
        if self.address is None:
            from .local import LocalCluster

            self.cluster = LocalCluster(n_workers=self.n_workers,
                                        threads_per_worker=self.threads_per_worker,
                                        **self.cluster_kwargs)
            await self.cluster._start()
            self.address = self.cluster.scheduler_address
        try:
            comm = await connect(self.address, timeout=self.timeout)
            await comm.write({"op": "register-client", "client": self.id})
            resp = await asyncio.wait_for(comm.read(), self.timeout)
        except (OSError, CommClosedError, asyncio.TimeoutError) as e:
            self.status = "closed"
            if self.cluster is not None:
                await self.cluster._close()
            raise OSError("Could not connect to a scheduler at %s within %s s: %s"
                          % (self.address, self.timeout, e)) from None
        if not isinstance(resp, dict) or resp.get("status") != "OK":
            comm.abort()
            self.status = "closed"
            if self.cluster is not None:
                await self.cluster._close()
            raise OSError("The scheduler at %s refused this executor: %r" % (self.address, resp))
        self.scheduler_comm = comm
        self.batched = BatchedSend(interval=0, name="executor->scheduler")
        self.batched.start(comm)
        self._stream_task = asyncio.ensure_future(self._handle_stream(comm))
        self.status = "running"
        if self.set_as_default:
            _current.append(weakref.ref(self))
        return self

    def _sync(self, func, *args, timeout=None, **kwargs):
        if self.asynchronous:
            return func(*args, **kwargs)
        if self.loop is None or self.status == "closed":
            raise RuntimeError("this executor is closed")
        return sync(self.loop, func, *args, timeout=timeout, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        await self._start()
        return self

    async def __aexit__(self, *exc):
        await self._close()

    def __repr__(self):
        return "<Executor: scheduler=%r, status=%s>" % (self.address, self.status)

    def close(self, timeout=30):
        """Disconnect, shut down a local cluster, stop the loop thread.
        Pending futures are cancelled.  Returns within ``timeout`` seconds."""
        if self.status == "closed":
            return
        if self.asynchronous:
            return self._close()
        try:
            sync(self.loop, self._close, timeout=timeout)
        except (TimeoutError, RuntimeError, OSError) as e:
            logger.warning("executor close did not finish cleanly: %s", e)
        finally:
            self._stop_loop()

    shutdown = close

    def _stop_loop(self):
        self.status = "closed"
        loop, thread = self.loop, self._thread
        if thread is not None and loop is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()

    async def _close(self):
        if self.status == "closed":
            return
        self.status = "closing"
        self._remove_default()
        with self._lock:
            states = list(self.futures.values())
        for st in states:
            if not st.done():
                st.cancel()
        if self.batched is not None:
            try:
                self._flush()
                self.batched.send({"op": "close-client"})
            except CommClosedError:
                pass
            await self.batched.close(timeout=2)
        if self._stream_task is not None:
            self._stream_task.cancel()
        if self.pool is not None:
            self.pool.close()
        if self.cluster is not None:
            await self.cluster._close()
        self.status = "closed"

    def _remove_default(self):
        _current[:] = [r for r in _current if r() is not None and r() is not self]

    # ------------------------------------------------------------ messages to the scheduler
    def _check_connected(self):
        if self.status == "disconnected":
            raise OSError("the executor has lost its scheduler at %s and is trying to "
                          "reconnect" % self.address)
        if self.status not in ("running", "connecting"):
            raise RuntimeError("this executor is %s" % self.status)

    def _send(self, *msgs):
        """Queue messages for the scheduler, in order, from any thread.
        Call with ``_lock`` held."""
        self._check_connected()
        self._outbox.extend(msgs)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self):
        with self._lock:
            self._drain_locked()
            msgs, self._outbox = self._outbox, []
            self._flush_scheduled = False
        if msgs and self.batched is not None and not self.batched.closing:
            self.batched.send(*msgs)

    def _wake_drain(self):
        if not self._drain_scheduled and self.loop is not None and self.status == "running":
            self._drain_scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self):
        self._drain_scheduled = False
        with self._lock:
            n = self._drain_locked()
        if n:
            self._flush()

    def _drain_locked(self):
        """Apply the decrements left by ``Future.__del__``."""
        released = []
        while self._releases:
            key, st = self._releases.popleft()
            if self.futures.get(key) is not st:
                continue  # a Future from before a restart or cancel
            self.refcount[key] -= 1
            if self.refcount[key] <= 0:
                del self.refcount[key]
                del self.futures[key]
                self._graph.release(key, self.futures)
                released.append(key)
        if released and self.status == "running":
            self._outbox.append({"op": "client-releases-keys", "keys": released})
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon_threadsafe(self._flush)
        return len(released)

    def _ref(self, key, state=None):
        """Count one more Future for ``key``; returns its FutureState."""
        with self._lock:
            st = self.futures.get(key)
            if st is None:
                st = state if state is not None else FutureState()
                self.futures[key] = st
            self.refcount[key] += 1
            return st

    # ------------------------------------------------------------ messages from the scheduler
    async def _handle_stream(self, comm):
        handlers = {
            "key-in-memory": self._on_key_in_memory,
            "task-erred": self._on_task_erred,
            "lost-data": self._on_lost_data,
            "worker-removed": self._on_worker_removed,
            "cancelled-keys": self._on_cancelled_keys,
            "restart": self._on_restart,
            "restart-done": self._on_restart_done,
        }
        try:
            while True:
                msgs = await comm.read()
                for msg in msgs:
                    op = msg.pop("op")
                    handler = handlers.get(op)
                    if handler is None:
                        logger.warning("executor: unknown message %r from the scheduler", op)
                        continue
                    handler(**msg)
        except (CommClosedError, asyncio.CancelledError):
            pass
        if self.status == "running":
            logger.error("executor lost its connection to the scheduler at %s", self.address)
            self._on_scheduler_lost()

    def _on_scheduler_lost(self):
        """Nothing will report on our keys any more: every Future made so far
        errs with a clear message (none is left waiting forever), and the
        executor keeps trying to reconnect for ``reconnect_timeout`` seconds.
        Calls made meanwhile raise an error saying so."""
        self.status = "disconnected"
        text = {"type": "CommClosedError",
                "text": "the connection to the scheduler at %s was lost; this "
                        "future's data is gone" % self.address}
        with self._lock:
            states = list(self.futures.values())
            self.futures.clear()
            self.refcount.clear()
            self._graph.clear()
            self._releases.clear()
            self._outbox = []
            self._flush_scheduled = False
        for st in states:
            if st.status != ERROR:
                st.set_error(text, None)
        for fut in self._restart_waiters.values():
            if not fut.done():
                fut.set_exception(OSError("lost the scheduler during restart"))
        if self.batched is not None:
            self.batched.abort()
        self._stream_task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout
        while self.status == "disconnected" and loop.time() < deadline:
            try:
                comm = await connect(self.address, timeout=min(2.0, self.reconnect_timeout))
                await comm.write({"op": "register-client", "client": self.id})
                resp = await asyncio.wait_for(comm.read(), self.timeout)
            except (OSError, CommClosedError, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
                continue
            if self.status != "disconnected":
                comm.abort()
                return
            if isinstance(resp, dict) and resp.get("status") == "OK":
                self.scheduler_comm = comm
                self.batched = BatchedSend(interval=0, name="executor->scheduler")
                self.batched.start(comm)
                self.status = "running"
                logger.info("executor reconnected to the scheduler at %s", self.address)
                await self._handle_stream(comm)
                return
            comm.abort()
            await asyncio.sleep(0.5)
        if self.status == "disconnected":
            logger.error("executor could not reconnect to the scheduler at %s within %s s",
                         self.address, self.reconnect_timeout)

    def _on_key_in_memory(self, key, nbytes=-1, type=None, workers=(), data=None):
        st = self.futures.get(key)
        if st is not None:
            st.finish(workers, type, data)

    def _on_task_erred(self, key, exception=None, traceback=None):
        st = self.futures.get(key)
        if st is not None:
            st.set_error(exception, traceback)

    def _on_lost_data(self, key):
        st = self.futures.get(key)
        if st is not None:
            st.lost()

    def _on_worker_removed(self, worker):
        # a fetch from it may never answer (a hung process keeps its socket)
        for fetch in self._fetches.pop(worker, ()):
            self._cut_fetches.add(fetch)
            fetch.cancel()
        with self._lock:
            states = list(self.futures.values())
        for st in states:
            if worker in st.workers:
                st.workers = tuple(w for w in st.workers if w != worker)

    def _on_cancelled_keys(self, keys):
        for key in keys:
            st = self.futures.get(key)
            if st is not None and st.status != CANCELLED:
                with self._lock:
                    if self.futures.get(key) is st:
                        del self.futures[key]
                        self.refcount.pop(key, None)
                        self._graph.release(key, self.futures)
                st.cancel()

    def _on_restart(self):
        self._cancel_all()

    def _on_restart_done(self, id, status="OK", text=""):
        fut = self._restart_waiters.pop(id, None)
        if fut is not None and not fut.done():
            if status == "OK":
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(text))

    def _cancel_all(self):
        with self._lock:
            states = list(self.futures.values())
            self.futures.clear()
            self.refcount.clear()
            self._graph.clear()
            self._releases.clear()
        for st in states:
            st.cancel()

    # ------------------------------------------------------------ submitting
    def _function_token(self, func):
        """``tokenize(func)``, cached per function object: hashing a function
        costs ~70 us, more than the rest of a submit."""
        entry = self._token_cache.get(id(func))
        if entry is not None and entry[0] is func:
            return entry[1]
        from dask.base import tokenize

        token = tokenize(func)
        self._token_cache[id(func)] = (func, token)
        return token

    def _dumps_function(self, func):
        entry = self._function_cache.get(id(func))
        if entry is not None and entry[0] is func:
            return entry[1]
        data = dumps_inband(func)
        self._function_cache[id(func)] = (func, data)
        return data

    def _check_refs(self, refs, batch):
        deps = []
        for ref in refs:
            if isinstance(ref, Future) and ref.executor is not self:
                raise ValueError("Future %r belongs to another executor" % (ref.key,))
            if ref.key not in self.futures and ref.key not in batch:
                raise ValueError("Future %r was released or cancelled" % (ref.key,))
            deps.append(ref.key)
        return deps

    def submit(self, func, *args, key=None, pure=True, workers=None, retries=None,
               priority=0, allow_other_workers=False, **kwargs):
        """Run ``func(*args, **kwargs)`` on the cluster; returns a Future at once.

        The key is ``funcname-<token>``: the token comes from the function and
        all inputs (``dask.base.tokenize``), so the same call gives the same
        key anywhere and is computed once.  ``pure=False`` gives a fresh key.
        ``workers``: addresses, names or hosts the task may run on;
        ``allow_other_workers=True`` makes that a preference, so that any
        worker runs it while none of those is connected.
        ``retries``: re-run the task up to this many times if it raises.
        ``priority``: higher runs earlier.
        """
        if not callable(func):
            raise TypeError("submit expects a callable, got %r" % (func,))
        if key is None:
            if pure:
                from dask.base import tokenize

                key = "%s-%s" % (funcname(func), tokenize(self._function_token(func), kwargs, *args))
            else:
                key = "%s-%s" % (funcname(func), uuid.uuid4().hex)
        with self._lock:
            self._drain_locked()  # a release of this key may be pending
            existing = self.futures.get(key)
        if existing is not None and existing.status != CANCELLED:
            return Future(key, self)
        refs = find_refs((args, kwargs), [])
        spec = {"function": self._dumps_function(func)}
        if args:
            spec["args"] = serialize(args)
        if kwargs:
            spec["kwargs"] = serialize(kwargs)
        if refs:
            # the graph entry must not keep the argument Futures alive
            args, kwargs = _without_futures(args), _without_futures(kwargs)
        return self._submit_tasks({key: spec}, {key: refs}, [key], {key: (func, args, kwargs)},
                                  workers=workers, retries=retries, priority=priority,
                                  allow_other_workers=allow_other_workers)[0]

    def _submit_tasks(self, specs, refs, keys, graph, workers=None, retries=None, priority=0,
                      orders=None, allow_other_workers=False):
        """Send tasks to the scheduler and return Futures for ``keys``."""
        if isinstance(workers, str):
            workers = [workers]
        with self._lock:
            # before anything is registered: a Future made now would wait forever
            self._check_connected()
            self._drain_locked()
            new_specs, deps = {}, {}
            for key, spec in specs.items():
                st = self.futures.get(key)
                if st is not None and st.status != CANCELLED:
                    continue  # known and alive: reuse
                new_specs[key] = spec
                deps[key] = self._check_refs(refs.get(key, ()), specs)
            futures = []
            for key in keys:
                st = self.futures.get(key)
                if st is None or st.status == CANCELLED:
                    st = self.futures[key] = FutureState()
                    self.refcount[key] = 0
                self.refcount[key] += 1
                futures.append(Future.__new__(Future))
            for key, g in graph.items():
                if key in new_specs:
                    self._graph.add(key, g, deps[key])
            msg = {"op": "update-graph", "tasks": new_specs,
                   "dependencies": deps, "keys": list(dict.fromkeys(keys)),
                   "user_priority": priority}
            if orders:
                msg["priority"] = orders
            if workers is not None:
                msg["restrictions"] = {k: list(workers) for k in new_specs}
                if allow_other_workers:
                    msg["loose_restrictions"] = list(new_specs)
            if retries:
                msg["retries"] = {k: retries for k in new_specs}
            self._send(msg)
        # Future.__init__ would take the lock again; fill them in directly
        for fut, key in zip(futures, keys):
            fut.key = key
            fut.executor = self
            fut._state = self.futures[key]
        return futures

    def map(self, func, *iterables, key=None, pure=True, workers=None, retries=None,
            priority=0, allow_other_workers=False, **kwargs):
        """``submit`` once per element: returns a list of Futures.

        Keyword arguments are passed whole to every call (a Future among
        them is replaced by its value on the worker).  Iterators are
        consumed into lists first.
        """
        if not callable(func):
            raise TypeError("map expects a callable, got %r" % (func,))
        if not iterables:
            raise TypeError("map needs at least one iterable")
        seqs = [list(it) for it in iterables]
        n = min(len(s) for s in seqs)
        arg_tuples = [tuple(s[i] for s in seqs) for i in range(n)]
        name = funcname(func)
        if key is not None:
            keys = list(key) if not isinstance(key, str) else ["%s-%d" % (key, i) for i in range(n)]
        elif pure:
            from dask.base import tokenize

            ftoken = self._function_token(func)
            # the same key as submit(func, *args, **kwargs)
            keys = ["%s-%s" % (name, tokenize(ftoken, kwargs, *args)) for args in arg_tuples]
        else:
            keys = ["%s-%s" % (name, uuid.uuid4().hex) for _ in range(n)]
        fbytes = self._dumps_function(func)
        kw_refs = find_refs(kwargs, []) if kwargs else []
        kw_ser = serialize(kwargs) if kwargs else None
        specs, refs, graph = {}, {}, {}
        for k, args in zip(keys, arg_tuples):
            if k in specs:
                continue
            spec = {"function": fbytes, "args": serialize(args)}
            if kw_ser is not None:
                spec["kwargs"] = kw_ser
            specs[k] = spec
            refs[k] = find_refs(args, list(kw_refs))
            graph[k] = (func, _without_futures(args) if refs[k] else args,
                        _without_futures(kwargs) if kw_refs else kwargs)
        # run in the order given; this also tells the scheduler which tasks a
        # worker was running when it died (equal priorities made the suspects
        # of a death arbitrary, and innocent tasks erred with KilledWorker)
        orders = {k: i for i, k in enumerate(specs)}
        return self._submit_tasks(specs, refs, keys, graph, workers=workers, retries=retries,
                                  priority=priority, orders=orders,
                                  allow_other_workers=allow_other_workers)

    def scatter(self, data, workers=None, broadcast=False, hash=True):
        """Send local data to the cluster; returns Futures for it at once.

        ``data``: one object (one Future), a list, tuple or set (a list of
        Futures), or a dict (a dict of Futures whose keys are the dict's
        keys).  Keys are ``typename-<token>`` of the value (``hash=False``:
        random), so scattering equal data twice gives the same key.  The data
        goes to the scheduler with the task that holds it, and the scheduler
        keeps those bytes (never unpickled) while the key is wanted, so a
        worker that dies loses no scattered data.  ``workers``: where it may
        live.  ``broadcast=True``: wait until it is in memory, then copy it
        to every worker (see :meth:`replicate`).
        """
        if broadcast and self.asynchronous:
            return self._scatter(data, workers, broadcast, hash)
        futures = self._scatter_tasks(data, workers, hash)
        if broadcast:
            self.replicate(futures)
        return futures

    async def _scatter(self, data, workers=None, broadcast=False, hash=True):
        futures = self._scatter_tasks(data, workers, hash)
        if broadcast:
            await self._replicate(futures)
        return futures

    def _scatter_tasks(self, data, workers, hash):
        from dask._task_spec import DataNode
        from dask.base import tokenize

        several = isinstance(data, (list, tuple, set, frozenset, Iterator))
        if isinstance(data, dict):
            keys, values = list(data), list(data.values())
        elif several:
            keys, values = None, list(data)
        else:  # one object, even if it is iterable like an array
            keys, values = None, [data]
        if keys is None:
            keys = ["%s-%s" % (type(v).__name__, tokenize(v) if hash else uuid.uuid4().hex)
                    for v in values]
        if [v for v in values if isinstance(v, Future)]:
            raise TypeError("scatter takes local data; these are already Futures")
        specs, graph = {}, {}
        for key, value in zip(keys, values):
            node = DataNode(key, value)
            specs[key] = {"task": serialize(node)}
            graph[key] = node
        futures = self._submit_tasks(specs, {}, keys, graph, workers=workers)
        if isinstance(data, dict):
            return dict(zip(keys, futures))
        return futures if several else futures[0]

    def replicate(self, futures, n=None):
        """Wait for ``futures``, then have their data copied until each is
        held by ``n`` workers (None: by every worker).  It only adds copies.
        Returns once the scheduler has asked for them; the workers fetch the
        copies in the background."""
        return self._sync(self._replicate, futures, n=n)

    async def _replicate(self, futures, n=None):
        flat = []
        _collect_futures(futures, flat)
        for f in flat:
            await f._state.wait()
        with self._lock:
            self._send({"op": "replicate", "keys": list(dict.fromkeys(f.key for f in flat)),
                        "n": n})

    def run(self, function, *args, workers=None, **kwargs):
        """Run ``function(*args, **kwargs)`` once on every worker (or on the
        addresses in ``workers``), in a thread there, outside of the task
        system: for set-up and inspection such as ``run(os.getpid)``.
        Returns ``{worker address: result}``; raises the first exception a
        worker raised."""
        return self._sync(self._run_on_workers, function, args, kwargs, workers)

    async def _run(self, function, *args, workers=None, **kwargs):
        return await self._run_on_workers(function, args, kwargs, workers)

    async def _run_on_workers(self, function, args, kwargs, workers):
        if workers is None:
            workers = list(await self._ncores())
        elif isinstance(workers, str):
            workers = [workers]
        payload = {"function": self._dumps_function(function), "args": serialize(args),
                   "kwargs": serialize(kwargs)}
        replies = await asyncio.gather(*[self.pool.rpc(w).run(**payload) for w in workers])
        out = {}
        for addr, reply in zip(workers, replies):
            if reply.get("status") == "raised":
                raise rebuild_exception(reply.get("exception"), reply.get("traceback"))
            out[addr] = deserialize(reply["result"])
        return out

    # ------------------------------------------------------------ gathering
    def gather(self, futures, errors="raise", timeout=None):
        """Values of ``futures`` (a Future, or lists/tuples/dicts of them),
        in the same structure.  Raises the first failed task's exception."""
        return self._sync(self._gather, futures, errors=errors, timeout=timeout)

    async def _gather(self, futures, errors="raise"):
        flat = []
        _collect_futures(futures, flat)
        keys = list(dict.fromkeys(f.key for f in flat))
        states = {}
        for f in flat:
            states.setdefault(f.key, f._state)
        data = {}
        for attempt in range(100):
            for key in keys:
                await states[key].wait()
            for f in flat:
                st = f._state
                if st.status == ERROR and errors == "raise":
                    raise st.make_exception()
                if st.status == CANCELLED and errors == "raise":
                    raise CancelledError("%r was cancelled" % (f.key,))
            for k in keys:
                st = states[k]
                if k not in data and st.status == FINISHED and st.data is not None:
                    data[k] = deserialize(st.data)
            need = [k for k in keys if k not in data and states[k].status == FINISHED]
            lost = await self._fetch(need, states, data)
            if not lost:
                break
            for key in lost:
                states[key].lost()
            await asyncio.sleep(min(0.01 * 2 ** attempt, 1.0))
        else:
            raise RuntimeError("could not gather %d keys: their data keeps vanishing" % len(lost))
        return _pack(futures, data, errors)

    async def _fetch(self, keys, states, data):
        """Fetch ``keys`` from the workers holding them into ``data``;
        returns the keys no worker had."""
        if not keys:
            return []
        by_worker = defaultdict(list)
        unknown = []
        for key in keys:
            workers = states[key].workers
            if workers:
                by_worker[workers[0]].append(key)
            else:
                unknown.append(key)
        missing = list(unknown)
        results = await asyncio.gather(
            *[self._get_data(w, ks) for w, ks in by_worker.items()], return_exceptions=True)
        for (worker, ks), res in zip(by_worker.items(), results):
            if isinstance(res, BaseException):
                if isinstance(res, (OSError, CommClosedError, RemoteError, asyncio.TimeoutError)):
                    missing.extend(ks)
                    continue
                raise res
            got, gone, errors = res
            if errors:
                key, text = next(iter(errors.items()))
                raise TypeError(text)
            for key, s in got.items():
                data[key] = deserialize(s)
            missing.extend(gone)
        if not missing:
            return []
        who_has = await self.pool.rpc(self.address).who_has(keys=missing)
        lost = []
        for key in missing:
            holders = who_has.get(key) or []
            if holders:
                states[key].workers = list(holders)[::-1] if len(holders) > 1 else holders
            else:
                lost.append(key)
        retry = [k for k in missing if k not in lost]
        if retry:
            lost.extend(await self._fetch_once(retry, states, data))
        return lost

    async def _fetch_once(self, keys, states, data):
        lost = []
        for key in keys:
            worker = states[key].workers[0]
            try:
                got, gone, errors = await self._get_data(worker, [key])
            except (OSError, CommClosedError, RemoteError, asyncio.TimeoutError):
                lost.append(key)
                continue
            if errors:
                raise TypeError(errors[key])
            if key in got:
                data[key] = deserialize(got[key])
            else:
                lost.append(key)
        return lost

    def _get_data(self, worker, keys):
        """Start fetching ``keys`` from ``worker``; returns an awaitable.  The
        call is registered at once, so that a ``worker-removed`` arriving
        before it gets to run still cuts it short (with CommClosedError)."""
        fetch = asyncio.ensure_future(self.pool.rpc(worker).get_data(keys=keys))
        self._fetches[worker].add(fetch)
        return self._await_fetch(worker, fetch)

    async def _await_fetch(self, worker, fetch):
        try:
            resp = await fetch
        except asyncio.CancelledError:
            if fetch not in self._cut_fetches:
                raise  # we were cancelled ourselves
            raise CommClosedError("worker %s was removed during the fetch" % worker) from None
        finally:
            self._cut_fetches.discard(fetch)
            running = self._fetches.get(worker)
            if running is not None:
                running.discard(fetch)
                if not running:
                    del self._fetches[worker]
        return resp["data"], resp.get("missing", []), resp.get("errors", {})

    # ------------------------------------------------------------ other operations
    def cancel(self, futures):
        """Cancel futures: pending work stops, data is freed, and every
        Future for those keys reports ``cancelled``."""
        flat = []
        _collect_futures(futures, flat)
        keys = list(dict.fromkeys(f.key for f in flat))
        with self._lock:
            states = []
            for key in keys:
                st = self.futures.pop(key, None)
                if st is not None:
                    self.refcount.pop(key, None)
                    self._graph.release(key, self.futures)
                    states.append(st)
            if keys and self.status == "running":
                self._send({"op": "cancel-keys", "keys": keys})
        for st in states:
            self.loop.call_soon_threadsafe(st.cancel) if not self.asynchronous else st.cancel()
        for f in flat:
            if not self.asynchronous:
                f._state.event.wait(5)

    async def _cancel(self, futures):
        self.cancel(futures)

    def restart(self, timeout=120):
        """Forget every task, restart every worker process; every existing
        Future is cancelled.  Returns once the workers are back."""
        return self._sync(self._restart, timeout=timeout)

    async def _restart(self, timeout=120):
        self._cancel_all()
        self._restart_ids += 1
        rid = self._restart_ids
        fut = asyncio.get_running_loop().create_future()
        self._restart_waiters[rid] = fut
        with self._lock:
            self._send({"op": "restart", "id": rid})
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._restart_waiters.pop(rid, None)
        return self

    def ncores(self):
        """Worker address -> number of threads."""
        return self._sync(self._ncores)

    nthreads = ncores

    async def _ncores(self):
        return await self.pool.rpc(self.address).ncores()

    def who_has(self, futures=None):
        """Key -> addresses of the workers holding its data."""
        return self._sync(self._who_has, futures)

    async def _who_has(self, futures=None):
        keys = None
        if futures is not None:
            flat = []
            _collect_futures(futures, flat)
            keys = [f.key for f in flat]
        return await self.pool.rpc(self.address).who_has(keys=keys)

    def has_what(self):
        """Worker address -> keys it holds."""
        return self._sync(self._has_what)

    async def _has_what(self):
        return await self.pool.rpc(self.address).has_what()

    def processing(self):
        return self._sync(self._processing)

    async def _processing(self):
        return await self.pool.rpc(self.address).processing()

    def scheduler_info(self):
        return self._sync(self._scheduler_info)

    async def _scheduler_info(self):
        return await self.pool.rpc(self.address).scheduler_info()

    @property
    def dask(self):
        """The graph of every computation this executor holds: key -> task,
        in dask's task-spec form."""
        from dask._task_spec import Task

        with self._lock:
            items = list(self._graph.tasks.items())
        out = {}
        for key, g in items:
            if isinstance(g, tuple):
                func, args, kwargs = g
                out[key] = Task(key, func, *args, **kwargs)
            else:
                out[key] = g
        return out

    def visualize(self, filename="mydask", format=None, **kwargs):
        """Draw ``executor.dask`` (the graph of every held computation) with
        graphviz, like ``dask.visualize``.  Needs the ``graphviz`` Python
        package and its ``dot`` program."""
        try:
            import graphviz  # noqa: F401
            from dask.dot import dot_graph
        except ImportError as e:
            raise ImportError("Executor.visualize needs graphviz: `pip install graphviz` and "
                              "the `dot` program (e.g. `apt-get install graphviz`)") from e
        return dot_graph(self.dask, filename=filename, format=format, **kwargs)

    # ------------------------------------------------------------ dask graphs
    def _graph_to_futures(self, dsk, keys, priority=0, workers=None, retries=None):
        from .graph import prepare_graph

        with self._lock:
            self._drain_locked()
            known = {k for k, st in self.futures.items() if st.status != CANCELLED}
        nodes, deps, order = prepare_graph(dsk, keys, known_keys=known)
        specs, refs = {}, {}
        for key, node in nodes.items():
            # even for keys held now: _submit_tasks decides under its lock
            # which are still alive, and a key released meanwhile needs it
            specs[key] = {"task": serialize(node)}
            refs[key] = [TaskRef(d) for d in deps[key]]
        flat = list(_flatten_keys(keys))
        return self._submit_tasks(specs, refs, flat, dict(nodes), workers=workers,
                                  retries=retries, priority=priority, orders=order)

    def get(self, dsk, keys, **kwargs):
        """Compute a dask graph on the cluster: ``keys`` may be a key or
        (nested) lists of keys; the result has the same nesting.  Extra
        keyword arguments that dask's local schedulers take are ignored."""
        futures = self._graph_to_futures(dsk, keys, priority=kwargs.get("priority", 0),
                                         workers=kwargs.get("workers"),
                                         retries=kwargs.get("retries"))
        try:
            by_key = dict(zip(_flatten_keys(keys), futures))
            values = self.gather(list(by_key.values()))
            results = dict(zip(by_key, values))
        finally:
            # hold nothing once we return: a new graph reusing these key
            # names must be computed afresh (cases/06)
            del futures
            by_key = None
            with self._lock:
                self._drain_locked()
        return _nest(keys, results)

    async def _get(self, dsk, keys, **kwargs):
        futures = self._graph_to_futures(dsk, keys)
        by_key = dict(zip(_flatten_keys(keys), futures))
        values = await self._gather(list(by_key.values()))
        results = dict(zip(by_key, values))
        del futures, by_key
        return _nest(keys, results)

    def compute(self, *collections, optimize_graph=True, priority=0, workers=None, retries=None,
                sync=False):
        """Start computing dask collections; returns one Future per
        collection at once (a single Future for a single collection, a list
        for several or for a list).  ``sync=True``: wait and return the
        values instead."""
        single = len(collections) == 1 and not isinstance(collections[0], (list, tuple))
        if len(collections) == 1 and isinstance(collections[0], (list, tuple)):
            collections = tuple(collections[0])
        from dask.base import collections_to_expr, is_dask_collection
        from dask._expr import FinalizeCompute

        out = [None] * len(collections)
        colls, idx = [], []
        for i, c in enumerate(collections):
            if is_dask_collection(c):
                colls.append(c)
                idx.append(i)
            else:
                out[i] = c
        if colls:
            expr = FinalizeCompute(collections_to_expr(colls, optimize_graph)).optimize()
            keys = [list(_flatten_keys(k))[0] for k in expr.__dask_keys__()]
            futures = self._graph_to_futures(expr, keys, priority=priority, workers=workers,
                                             retries=retries)
            for i, f in zip(idx, futures):
                out[i] = f
        if sync:
            return self.gather(out[0] if single else out)
        return out[0] if single else out

    def persist(self, collections, optimize_graph=True, priority=0, workers=None, retries=None,
                **kwargs):
        """Start computing collections and return equivalent collections
        backed by futures (keep them to keep the data on the cluster)."""
        single = not isinstance(collections, (list, tuple))
        colls = [collections] if single else list(collections)
        from dask.base import collections_to_expr

        expr = collections_to_expr(colls, optimize_graph).optimize()
        key_lists = expr.__dask_keys__()
        flat = list(_flatten_keys(key_lists))
        futures = self._graph_to_futures(expr, flat, priority=priority, workers=workers,
                                         retries=retries)
        fmap = dict(zip(flat, futures))
        out = []
        for coll in colls:
            rebuild, args = coll.__dask_postpersist__()
            ks = list(_flatten_keys(coll.__dask_keys__()))
            out.append(rebuild({k: fmap[k] for k in ks if k in fmap}, *args))
        return out[0] if single else out


Executor = Client


def _without_futures(obj):
    """``obj`` with every Future inside lists, tuples, sets and dict values
    replaced by a plain TaskRef (which does not hold a reference count)."""
    if isinstance(obj, Future):
        return TaskRef(obj.key)
    typ = type(obj)
    if typ in (list, tuple, set, frozenset):
        return typ(_without_futures(o) for o in obj)
    if typ is dict:
        return {k: _without_futures(v) for k, v in obj.items()}
    return obj


def _flatten_keys(keys):
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten_keys(k)
    else:
        yield keys


def _nest(keys, results):
    if isinstance(keys, list):
        return [_nest(k, results) for k in keys]
    return results[keys]


def _collect_futures(obj, out):
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for o in obj:
            _collect_futures(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _collect_futures(o, out)
    elif _is_iterator_like(obj):
        raise TypeError("gather expects futures or lists/tuples/dicts of them, got %s"
                        % type(obj).__name__)


def _pack(obj, data, errors):
    if isinstance(obj, Future):
        return data[obj.key]
    if isinstance(obj, list):
        return [_pack(o, data, errors) for o in obj
                if not (errors == "skip" and isinstance(o, Future) and o.key not in data)]
    if isinstance(obj, tuple):
        return tuple(_pack(o, data, errors) for o in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_pack(o, data, errors) for o in obj)
    if isinstance(obj, dict):
        return {k: _pack(v, data, errors) for k, v in obj.items()
                if not (errors == "skip" and isinstance(v, Future) and v.key not in data)}
    return obj


# ---------------------------------------------------------------- module functions

def default_client():
    """The newest open executor that is set as default; ValueError if none."""
    for ref in reversed(_current):
        ex = ref()
        if ex is not None and ex.status == "running":
            return ex
    raise ValueError("No Executor found. Start one with `Executor()`.")


def get_client(address=None, timeout=None):
    """The default executor (dask calls this to find a cluster);
    ValueError when there is none."""
    return default_client()


def _current_executor(allow_global=True):
    return default_client()


Client.current = staticmethod(_current_executor)


def _close_all():
    for ex in list(_all_executors):
        try:
            if ex.status not in ("closed",) and not ex.asynchronous:
                ex.close(timeout=10)
        except Exception:  # exit must go on
            pass


atexit.register(_close_all)

__all__ = ["Executor", "Client", "Future", "as_completed", "wait", "futures_of",
           "default_client", "get_client", "KilledWorker", "CancelledError"]
