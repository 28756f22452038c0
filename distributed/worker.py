"""The worker server: runs tasks in threads, holds results, serves data.

This module moves messages in and out of :class:`~distributed.worker_state.WorkerState`
and carries out its instructions: it runs tasks in a thread pool, fetches
dependencies straight from peer workers (``get-data``), and keeps one batched
stream to the scheduler (``register-worker``, then ``compute-task`` /
``free-keys`` in, ``task-finished`` / ``task-erred`` / ``missing-data`` /
``heartbeat`` out).  It decides nothing itself.

State:

* ``data``: key -> value, the results and fetched copies held here
* ``state``: the WorkerState
* ``scheduler_comm`` / ``batched``: the stream to the scheduler
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from .comm import CommClosedError, connect, normalize_address
from .core import ConnectionPool, RemoteError, Server
from .batched import BatchedSend
from .protocol import ProtocolError, Serialized, deserialize, serialize
from .utils import LRU, TaskError, format_exception_text, sizeof, substitute_refs
from .worker_state import FLIGHT, WorkerState

logger = logging.getLogger(__name__)
MB = 10**6  # sizes in logs are in the units of --memory-limit 500MB (dask.utils.parse_bytes)

_function_cache = LRU(1000)

#: Results up to this size travel with ``task-finished`` to the client that
#: waits for them, saving it a round trip to fetch them.
INLINE_RESULT_BYTES = 16 * 1024
_function_lock = threading.Lock()


def loads_function(payload):
    """Unpickle a function, caching by its pickled bytes (tasks of one
    ``map`` share them)."""
    payload = bytes(payload)
    with _function_lock:
        func = _function_cache.get(payload)
    if func is None:
        func = deserialize(Serialized(payload))
        with _function_lock:
            _function_cache[payload] = func
    return func


class TaskThreads:
    """Runs tasks in threads, at most ``nthreads`` at a time.

    A task that nobody wants any more (``abandon``) gives its slot back at
    once, since a Python thread cannot be stopped: it finishes in the
    background on a spare thread, and one that had not started yet is
    skipped.  At most ``spare`` abandoned runs can go on at once; past that,
    new tasks wait for one of them to end.
    """

    def __init__(self, nthreads, spare=32):
        self._pool = ThreadPoolExecutor(nthreads + spare, thread_name_prefix="dask-worker-task")
        self._slots = threading.Semaphore(nthreads)
        self._lock = threading.Lock()
        # key -> "queued", "running" (holds a slot), "free" (abandoned while
        # running: its slot was given back) or "skip" (abandoned while queued)
        self._runs = {}

    def submit(self, key, fn, *args):
        with self._lock:
            self._runs[key] = "queued"
        return self._pool.submit(self._run, key, fn, args)

    def _run(self, key, fn, args):
        self._slots.acquire()
        with self._lock:
            if self._runs.get(key) == "skip":
                del self._runs[key]
                self._slots.release()
                return None
            self._runs[key] = "running"
        try:
            return fn(*args)
        finally:
            with self._lock:
                if self._runs.pop(key, None) == "running":
                    self._slots.release()

    def abandon(self, key):
        with self._lock:
            state = self._runs.get(key)
            if state == "running":
                self._runs[key] = "free"
                self._slots.release()
            elif state == "queued":
                self._runs[key] = "skip"

    def resume(self, key):
        """Undo ``abandon``.  A run already going does not take its slot back
        (that could block the loop), so until it ends one more task than
        ``nthreads`` may run."""
        with self._lock:
            if self._runs.get(key) == "skip":
                self._runs[key] = "queued"

    def shutdown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_task(run_spec, key, deps):
    """Run one task (in a worker thread).  Returns ``(ok, value_or_error,
    nbytes, type_name)``.  Never raises."""
    try:
        if "task" in run_spec:
            node = deserialize(run_spec["task"])
            result = node(deps)
        else:
            func = loads_function(run_spec["function"])
            args = deserialize(run_spec["args"]) if "args" in run_spec else ()
            kwargs = deserialize(run_spec["kwargs"]) if "kwargs" in run_spec else {}
            if deps:
                args = substitute_refs(args, deps)
                kwargs = substitute_refs(kwargs, deps)
            result = func(*args, **kwargs)
    except BaseException as e:  # the task's own failure is data, reported to the client
        return False, e, 0, None
    try:
        nbytes = sizeof(result)
    except Exception:
        nbytes = sys.getsizeof(result)
    return True, result, nbytes, type(result).__name__


def pack_exception(e: BaseException):
    """Exception to ``(Serialized, traceback text)`` for the wire; an
    exception that cannot be pickled is replaced by a TaskError with its text."""
    text = format_exception_text(e)
    # the traceback travels as text; pickled frames (with tblib installed)
    # would rebuild reference cycles in the client that keep Futures alive
    seen = set()
    x = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        x.__traceback__ = None
        x = x.__cause__ or x.__context__
    try:
        s = serialize(e)
        # check it can come back (some exceptions pickle but do not unpickle)
        deserialize(s)
    except Exception:
        s = serialize(TaskError("%s: %s" % (type(e).__name__, e)))
    return s, text


class Worker(Server):
    """A worker process's server.

    Parameters
    ----------
    scheduler_address: where the scheduler listens
    nthreads: threads that run tasks
    host, port: where to listen for peers (port 0: any free port)
    name: a name for the scheduler's listings (default: the address)
    nanny: address of the supervising nanny, if any
    connect_timeout: seconds to keep trying to reach the scheduler at start
    reconnect_timeout: seconds to keep trying after losing it
    """

    def __init__(self, scheduler_address, nthreads=1, host="127.0.0.1", port=0, name=None,
                 nanny=None, connect_timeout=30.0, reconnect_timeout=60.0,
                 heartbeat_interval=1.0, validate=False, memory_limit=0):
        handlers = {
            "get-data": self.handle_get_data,
            "keys": self.handle_keys,
            "run": self.handle_run,
            "terminate": self.handle_terminate,
        }
        super().__init__(handlers, name="worker")
        self.scheduler_address = normalize_address(scheduler_address)
        self.nthreads = nthreads
        self.host = host
        self.port = port
        self.worker_name = name
        self.nanny = nanny
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.heartbeat_interval = heartbeat_interval
        self.validate = validate
        self.memory_limit = memory_limit
        self.data = {}
        self.state = None
        self.executor = TaskThreads(nthreads)
        self._fetches = {}  # peer -> the task fetching from it
        self.pool = ConnectionPool(limit=64)
        self.batched = None
        self.scheduler_comm = None
        self.loop = None
        self._tasks = set()
        self.finished = None

    def __repr__(self):
        return "<Worker %s: %d in memory>" % (self.address, len(self.data))

    # ------------------------------------------------------------ life cycle
    async def start(self):
        self.loop = asyncio.get_running_loop()
        self.finished = asyncio.Event()
        await self.listen("tcp://%s:%d" % (self.host, self.port))
        self.state = WorkerState(self.address, self.nthreads, validate=self.validate)
        await self._register(self.connect_timeout)
        self._spawn(self._heartbeat())
        if self.memory_limit:
            self._spawn(self._memory_monitor())
        logger.info("worker at %s, %d threads, scheduler %s", self.address, self.nthreads,
                    self.scheduler_address)
        return self

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _register(self, timeout):
        comm = await connect(self.scheduler_address, timeout=timeout)
        await comm.write({
            "op": "register-worker", "address": self.address, "nthreads": self.nthreads,
            "name": self.worker_name, "nanny": self.nanny, "memory_limit": self.memory_limit,
            "keys": {k: wt.nbytes for k, wt in self.state.tasks.items()
                     if wt.owned and k in self.data},
        })
        resp = await asyncio.wait_for(comm.read(), timeout)
        if not isinstance(resp, dict) or resp.get("status") != "OK":
            comm.abort()
            raise ValueError("scheduler refused registration: %s" % (resp,))
        self.scheduler_comm = comm
        self.batched = BatchedSend(interval=0.0005, name="worker->scheduler")
        self.batched.start(comm)
        self._spawn(self._scheduler_stream(comm))

    async def _scheduler_stream(self, comm):
        handlers = {
            "compute-task": self._compute_task,
            "free-keys": self._free_keys,
            "worker-removed": self._peer_removed,
            "acquire-replicas": self._acquire_replicas,
            "clear": self._clear,
            "close": self._close_from_scheduler,
        }
        try:
            while True:
                msgs = await comm.read()
                for msg in msgs:
                    op = msg.pop("op", None)
                    handler = handlers.get(op)
                    if handler is None:
                        logger.warning("worker %s: unknown op %r from the scheduler", self.address, op)
                        continue
                    try:
                        handler(**msg)
                    except TypeError as e:
                        logger.warning("worker %s: bad %r message: %s", self.address, op, e)
        except CommClosedError:
            pass
        except ProtocolError as e:
            logger.error("worker %s: undecodable message from the scheduler: %s", self.address, e)
        comm.abort()
        if self.status != "running":
            return
        logger.warning("worker %s lost the scheduler at %s; reconnecting for up to %.0f s",
                       self.address, self.scheduler_address, self.reconnect_timeout)
        try:
            await self._register(self.reconnect_timeout)
            logger.info("worker %s re-registered with the scheduler", self.address)
        except (OSError, asyncio.TimeoutError, ValueError, CommClosedError) as e:
            logger.error("worker %s could not reach the scheduler again (%s); closing",
                         self.address, e)
            await self.close()

    async def _heartbeat(self):
        while self.status == "running":
            await asyncio.sleep(self.heartbeat_interval)
            if self.batched is not None and not self.batched.closing:
                self.batched.send({"op": "heartbeat", "executing": len(self.state.executing),
                                   "in_memory": len(self.data)})

    #: Fractions of ``memory_limit``: stop starting tasks past the first,
    #: exit (a nanny starts a fresh worker) past the second.
    memory_pause_fraction = 0.8
    memory_terminate_fraction = 0.95

    async def _memory_monitor(self, interval=0.2):
        import psutil

        proc = psutil.Process()
        while self.status == "running":
            await asyncio.sleep(interval)
            rss = proc.memory_info().rss
            frac = rss / self.memory_limit
            if frac > self.memory_terminate_fraction:
                logger.error("worker %s uses %d MB, over %d%% of its memory limit of %d MB: "
                             "exiting so that its nanny restarts it", self.address, rss // MB,
                             self.memory_terminate_fraction * 100, self.memory_limit // MB)
                await self.close()
                os._exit(1)
            paused = frac > self.memory_pause_fraction
            if paused != self.state.paused:
                logger.warning("worker %s %s: %d MB of a %d MB memory limit", self.address,
                               "pauses (takes no new tasks)" if paused else "resumes",
                               rss // MB, self.memory_limit // MB)
                self._run(self.state.stimulus_pause(paused))
                if self.batched is not None and not self.batched.closing:
                    self.batched.send({"op": "worker-paused", "paused": paused})

    async def close(self, timeout=5.0):
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        self.stop_listening()
        if self.batched is not None:
            try:
                self.batched.send({"op": "unregister"})
            except CommClosedError:
                pass
            await self.batched.close(timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        self.close_comms()
        self.pool.close()
        self.executor.shutdown()
        self.status = "closed"
        self.finished.set()

    async def handle_terminate(self, comm):
        self._spawn(self.close())
        return "OK"

    def _close_from_scheduler(self, reason=""):
        logger.info("worker %s: the scheduler asked us to close (%s)", self.address, reason)
        self._spawn(self.close())

    # ------------------------------------------------------------ stimuli in, instructions out
    def _run(self, instructions):
        for inst in instructions:
            kind = inst[0]
            if kind == "execute":
                self._execute(inst[1])
            elif kind == "send":
                if self.batched is not None and not self.batched.closing:
                    self.batched.send(inst[1])
            elif kind == "gather":
                self._fetches[inst[1]] = self._spawn(self._gather(inst[1], inst[2]))
            elif kind == "abandon":
                self.executor.abandon(inst[1])
            elif kind == "resume":
                self.executor.resume(inst[1])
            elif kind == "delete":
                for key in inst[1]:
                    self.data.pop(key, None)

    def _compute_task(self, key, run_spec, priority, run_id, who_has=None, nbytes=None,
                      report=False):
        self._run(self.state.stimulus_compute_task(key, run_spec, priority, run_id, who_has,
                                                   nbytes, report))

    def _free_keys(self, keys, run_id=None):
        self._run(self.state.stimulus_free_keys(keys, run_id))

    def _acquire_replicas(self, who_has, nbytes=None):
        self._run(self.state.stimulus_acquire_replicas(who_has, nbytes))

    def _peer_removed(self, worker):
        # a hung peer never answers: stop waiting, try another holder
        fetch = self._fetches.get(worker)
        if fetch is not None:
            fetch.cancel()
        self._run(self.state.stimulus_peer_removed(worker))

    def _clear(self):
        self._run(self.state.stimulus_clear())

    def _execute(self, key):
        wt = self.state.tasks[key]
        try:
            deps = {dep: self.data[dep] for dep in wt.dependencies}
        except KeyError as e:
            self._execute_done(key, False, RuntimeError("dependency %s vanished" % e), 0, None)
            return
        fut = self.executor.submit(key, self._run_task_here, wt.run_spec, key, deps)
        loop = self.loop

        def done(f):
            try:
                loop.call_soon_threadsafe(self._execute_done_future, key, f)
            except RuntimeError:
                pass  # the loop is closed: the worker is shutting down

        fut.add_done_callback(done)

    def _execute_done_future(self, key, fut):
        if fut.cancelled():
            return
        outcome = fut.result()
        if outcome is None:  # abandoned before it started
            outcome = (False, RuntimeError("task %r was cancelled before it ran" % (key,)), 0, None)
        ok, value, nbytes, type_name = outcome
        self._execute_done(key, ok, value, nbytes, type_name)

    def _execute_done(self, key, ok, value, nbytes, type_name):
        if self.status not in ("running",):
            return
        if ok:
            self.data[key] = value
            data = None
            wt = self.state.tasks.get(key)
            if wt is not None and wt.report and nbytes <= INLINE_RESULT_BYTES:
                try:
                    data = serialize(value)
                except TypeError:
                    data = None  # the client's fetch will report the error
                if data is not None and data.nbytes > INLINE_RESULT_BYTES:
                    data = None
            self._run(self.state.stimulus_execute_done(key, None, True, nbytes=nbytes,
                                                       type=type_name, data=data))
        else:
            exc, text = pack_exception(value)
            self._run(self.state.stimulus_execute_done(
                key, None, False, exception=exc, traceback=text))

    async def _gather(self, peer, keys):
        got, missing, errors, failed = {}, [], {}, False
        try:
            resp = await self.pool.rpc(peer).get_data(keys=keys)
            missing = list(resp.get("missing", ()))
            for key, text in resp.get("errors", {}).items():
                errors[key] = text
            for key, s in resp["data"].items():
                wt = self.state.tasks.get(key)
                if wt is None or wt.state != FLIGHT:
                    continue
                try:
                    self.data[key] = deserialize(s)
                except Exception as e:
                    errors[key] = "Could not deserialize %r: %s: %s" % (key, type(e).__name__, e)
                    continue
                got[key] = wt.nbytes
        except (OSError, CommClosedError, RemoteError, asyncio.TimeoutError, KeyError,
                TypeError) as e:
            logger.info("worker %s: fetch of %d keys from %s failed: %s",
                        self.address, len(keys), peer, e)
            failed = True
        except asyncio.CancelledError:
            if self.status != "running":
                raise
            logger.info("worker %s: fetch from %s stopped: the scheduler removed it",
                        self.address, peer)
            failed = True
        finally:
            if self._fetches.get(peer) is asyncio.current_task():
                del self._fetches[peer]
        if self.status != "running":
            return
        out = []
        if errors:
            out.extend(self._dependency_errors(errors))
        out.extend(self.state.stimulus_gather_done(
            peer, got, missing=missing + [k for k in keys if k in errors], failed=failed))
        self._run(out)

    def _dependency_errors(self, errors):
        """A dependency cannot be moved (it does not pickle or unpickle):
        the tasks that need it fail with that error."""
        out = []
        for key, text in errors.items():
            wt = self.state.tasks.get(key)
            if wt is None:
                continue
            for dkey in list(wt.dependents):
                dwt = self.state.tasks.get(dkey)
                if dwt is None or dwt.run_spec is None:
                    continue
                exc, tb = pack_exception(TypeError(text))
                out.append(("send", {"op": "task-erred", "key": dkey, "run_id": dwt.run_id,
                                     "exception": exc, "traceback": tb}))
                self.state._forget_task(dwt, out)
        return out

    # ------------------------------------------------------------ handlers
    async def handle_get_data(self, comm, keys, who=None):
        """``{'op': 'get-data', 'keys': [...]}`` -> ``{'status': 'OK', 'data':
        {key: Serialized}, 'missing': [...], 'errors': {key: text}}``"""
        data, missing, errors = {}, [], {}
        for key in keys:
            if key in self.data:
                try:
                    data[key] = serialize(self.data[key])
                except TypeError as e:
                    errors[key] = str(e)
            else:
                missing.append(key)
        return {"status": "OK", "data": data, "missing": missing, "errors": errors}

    async def handle_keys(self, comm):
        return list(self.data)

    def _run_task_here(self, run_spec, key, deps):
        _task_thread.worker = self  # for get_worker() in the task
        return run_task(run_spec, key, deps)

    async def handle_run(self, comm, function, args=None, kwargs=None):
        """``{'op': 'run', 'function': bytes, 'args': Serialized, 'kwargs':
        Serialized}`` -> ``{'status': 'OK', 'result': Serialized}`` or
        ``{'status': 'raised', 'exception': Serialized, 'traceback': text}``.
        Runs the function in a thread of its own (not a task slot)."""

        def call():
            _task_thread.worker = self
            func = loads_function(function)
            return func(*(deserialize(args) if args is not None else ()),
                        **(deserialize(kwargs) if kwargs is not None else {}))

        try:
            result = await asyncio.get_running_loop().run_in_executor(None, call)
            return {"status": "OK", "result": serialize(result)}
        except Exception as e:  # the user's function failed: reported to the caller
            exception, text = pack_exception(e)
            # not 'error': that status means the request itself failed
            return {"status": "raised", "exception": exception, "traceback": text}


def format_address(host, port):
    return "tcp://%s:%d" % (host, port)


def _parent_watchdog(loop, worker, parent_pid, interval=1.0):
    """Close the worker if the process that started it (its nanny) dies."""

    async def watch():
        while worker.status == "running":
            await asyncio.sleep(interval)
            if os.getppid() != parent_pid:
                logger.error("worker %s: nanny %d is gone; exiting", worker.address, parent_pid)
                await worker.close()
                return

    return worker._spawn(watch())


_task_thread = threading.local()


def get_worker():
    """The :class:`Worker` running the current task (or ``Executor.run``
    function).  Raises ValueError outside of one."""
    worker = getattr(_task_thread, "worker", None)
    if worker is None or worker.status != "running":
        raise ValueError("get_worker() called outside of a task on a worker")
    return worker


def get_client(timeout=None):
    """The Executor that is active in this process, for code running in a
    task.  Raises ValueError when there is none: tasks then compute with
    dask's local schedulers, which is what dask falls back to."""
    from .executor import default_client

    return default_client()
