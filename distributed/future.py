"""Futures: what the executor hands out for remote results.

A :class:`Future` names a key on the cluster; every Future for one key shares
one :class:`FutureState` (status, and once done, where the data is or what
went wrong).  Only the executor's event loop changes a FutureState; any
thread may wait on it.  :class:`as_completed`, :func:`wait` and
:func:`futures_of` work on Futures like their ``concurrent.futures``
namesakes.

This module does no I/O: fetching a value goes through the Future's
executor (``executor._gather``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading

from dask._task_spec import TaskRef

from .comm import CommClosedError
from .protocol import Serialized, deserialize
from .utils import TaskError

logger = logging.getLogger(__name__)

CancelledError = concurrent.futures.CancelledError

PENDING, FINISHED, ERROR, CANCELLED, LOST = "pending", "finished", "error", "cancelled", "lost"


class KilledWorker(Exception):
    """A task was running on workers that died too many times in a row."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised on a worker; set as
    the ``__cause__`` of the re-raised exception, as ``concurrent.futures``
    does for process pools."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return "\n\nRemote traceback:\n\"\"\"\n%s\"\"\"" % self.tb


_SCHEDULER_ERRORS = {"KilledWorker": KilledWorker, "ValueError": ValueError,
                     "CancelledError": CancelledError, "CommClosedError": CommClosedError}


class FutureState:
    """What is known about one key: status and, once done, where the data
    is or what went wrong.  Changed only on the executor's loop."""

    __slots__ = ("status", "exception", "traceback", "type", "workers", "event",
                 "waiters", "callbacks", "data")

    def __init__(self):
        self.status = PENDING
        self.exception = None
        self.traceback = None
        self.type = None
        self.workers = ()
        self.data = None
        self.event = threading.Event()
        self.waiters = []
        self.callbacks = []

    def done(self):
        return self.status in (FINISHED, ERROR, CANCELLED)

    def _set(self, status):
        self.status = status
        self.event.set()
        waiters, self.waiters = self.waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:
                pass
        callbacks, self.callbacks = self.callbacks, []
        for future, fn in callbacks:
            _run_callback(fn, future)

    def finish(self, workers=(), type=None, data=None):
        self.workers = workers
        self.type = type
        self.data = data
        self._set(FINISHED)

    def set_error(self, exception, traceback):
        self.exception = exception
        self.traceback = traceback
        self._set(ERROR)

    def cancel(self):
        if self.status != CANCELLED:
            self._set(CANCELLED)

    def lost(self):
        """The data is gone; the scheduler recomputes it."""
        if self.status == FINISHED:
            self.status = PENDING
            self.workers = ()
            self.data = None
            self.event.clear()

    async def wait(self):
        if self.done():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiters.append((loop, fut))
        if self.done():  # finished between the check and the append (another thread)
            return
        await fut

    def make_exception(self):
        """A fresh exception object each call: raising one adds frames to its
        traceback, and a stored exception holding those frames would keep
        Futures alive (cases/14)."""
        return rebuild_exception(self.exception, self.traceback)


def rebuild_exception(exc, traceback):
    """The exception a worker or the scheduler reported, ready to raise:
    ``exc`` is a ``Serialized`` exception or a ``{'type', 'text'}`` dict,
    ``traceback`` the remote traceback text (it becomes ``__cause__``)."""
    if isinstance(exc, Serialized):
        try:
            e = deserialize(exc)
        except Exception as err:
            e = TaskError("the task failed, and its exception could not be unpickled: %s" % err)
    elif isinstance(exc, dict):
        e = _SCHEDULER_ERRORS.get(exc.get("type"), TaskError)(exc.get("text", ""))
    else:
        e = TaskError(traceback or "task failed")
    if traceback and isinstance(exc, Serialized):
        e.__cause__ = RemoteTraceback(traceback)
    return e


def _resolve(fut):
    if not fut.done():
        fut.set_result(None)


def _run_callback(fn, future):
    try:
        fn(future)
    except Exception:
        logger.exception("done-callback %r of %r raised", fn, future)


class Future(TaskRef):
    """A remote result.  ``key`` names it on the cluster.

    ``status`` is one of pending, finished, error, cancelled.  ``result()``
    waits and returns the value (or raises the task's exception);
    ``await future`` does the same in async code.  Futures can be passed to
    ``submit``/``map``: the task then receives the value, and the data never
    comes to this process.
    """

    __slots__ = ("executor", "_state", "__weakref__")

    def __init__(self, key, executor, state=None):
        self.key = key
        self.executor = executor
        self._state = executor._ref(key, state)

    # the state is the one of the generation this Future was made in
    @property
    def status(self):
        return self._state.status

    def done(self):
        return self._state.done()

    def cancelled(self):
        return self._state.status == CANCELLED

    def result(self, timeout=None):
        """Wait for the value; raise the task's exception if it failed,
        ``CancelledError`` if cancelled, ``TimeoutError`` after ``timeout``."""
        if self.executor.asynchronous:
            return self._result()
        st = self._state
        if not st.event.wait(timeout):
            raise TimeoutError("result of %r not ready after %s s" % (self.key, timeout))
        data = st.data
        if data is not None and st.status == FINISHED:
            return deserialize(data)  # small result sent along: no round trip
        if st.status == ERROR:
            raise st.make_exception()
        if st.status == CANCELLED:
            raise CancelledError("%r was cancelled" % (self.key,))
        return self.executor._sync(self._result, timeout=timeout)

    async def _result(self, raiseit=True):
        await self._state.wait()
        st = self._state
        if st.status == ERROR:
            raise st.make_exception()
        if st.status == CANCELLED:
            raise CancelledError("%r was cancelled" % (self.key,))
        return (await self.executor._gather([self]))[0]

    def exception(self, timeout=None):
        """The exception the task raised (None if it succeeded)."""
        if not self._state.event.wait(timeout):
            raise TimeoutError("%r not done after %s s" % (self.key, timeout))
        if self._state.status == ERROR:
            return self._state.make_exception()
        return None

    async def _exception(self):
        await self._state.wait()
        return self._state.make_exception() if self._state.status == ERROR else None

    def traceback(self, timeout=None):
        """The remote traceback of a failed task, as text (None otherwise)."""
        if not self._state.event.wait(timeout):
            raise TimeoutError("%r not done after %s s" % (self.key, timeout))
        return self._state.traceback if self._state.status == ERROR else None

    def cancel(self):
        """Cancel this key: stop its work if pending and free its data."""
        self.executor.cancel([self])

    def add_done_callback(self, fn):
        """Call ``fn(future)`` when done (at once, here, if already done;
        otherwise on the executor's loop thread)."""
        st = self._state
        if st.done():
            _run_callback(fn, self)
        else:
            st.callbacks.append((self, fn))
            if st.done() and (self, fn) in st.callbacks:
                st.callbacks.remove((self, fn))
                _run_callback(fn, self)

    def __await__(self):
        return self._result().__await__()

    def __dask_tokenize__(self):
        return (type(self).__name__, self.key)

    def __reduce__(self):
        return TaskRef, (self.key,)

    def __repr__(self):
        st = self._state
        if st.status == FINISHED and st.type:
            return "<Future: status: finished, type: %s, key: %s>" % (st.type, self.key)
        return "<Future: status: %s, key: %s>" % (st.status, self.key)

    __str__ = __repr__

    def __del__(self):
        try:
            self.executor._releases.append((self.key, self._state))
            self.executor._wake_drain()
        except (AttributeError, RuntimeError):
            pass  # interpreter shutdown, or half-built


def _is_iterator_like(x):
    return not isinstance(x, (list, tuple, range, dict, set, str, bytes)) and hasattr(x, "__iter__")



class as_completed:
    """Iterate over futures in the order they finish (failed and cancelled
    ones included).  A future given twice is yielded twice.  More can be
    added with ``add`` while iterating.  ``timeout`` bounds each wait.

    >>> for future in as_completed(futures):   # doctest: +SKIP
    ...     print(future.result())
    """

    def __init__(self, futures=(), with_results=False, timeout=None):
        self.queue = queue.Queue()
        self.count = 0
        self.lock = threading.Lock()
        self.with_results = with_results
        self.timeout = timeout
        for f in futures:
            self.add(f)

    def add(self, future):
        with self.lock:
            self.count += 1
        future.add_done_callback(self.queue.put)

    def update(self, futures):
        for f in futures:
            self.add(f)

    def is_empty(self):
        return self.count == 0

    def __len__(self):
        return self.count

    def __iter__(self):
        return self

    def __next__(self):
        with self.lock:
            if self.count == 0:
                raise StopIteration
        try:
            f = self.queue.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError("no future finished within %s s" % self.timeout) from None
        with self.lock:
            self.count -= 1
        if self.with_results:
            return f, f.result()
        return f

    def __aiter__(self):
        return self

    async def __anext__(self):
        with self.lock:
            if self.count == 0:
                raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while True:
            try:
                f = self.queue.get_nowait()
                break
            except queue.Empty:
                if deadline is not None and loop.time() > deadline:
                    raise TimeoutError("no future finished within %s s" % self.timeout) from None
                await asyncio.sleep(0.002)
        with self.lock:
            self.count -= 1
        if self.with_results:
            return f, await f._result()
        return f


def wait(fs, timeout=None, return_when="ALL_COMPLETED"):
    """Wait until futures are done, like ``concurrent.futures.wait``:
    returns ``(done, not_done)`` sets.  Accepts dask collections (waits on
    the futures inside them)."""
    flat = futures_of(fs) if not isinstance(fs, Future) else [fs]
    if flat and flat[0].executor.asynchronous:
        return _wait(flat, timeout, return_when)
    done_event = threading.Event()
    pending = set(flat)
    lock = threading.Lock()

    def on_done(f):
        with lock:
            pending.discard(f)
            if return_when == "FIRST_COMPLETED" or not pending:
                done_event.set()
            elif return_when == "FIRST_EXCEPTION" and f.status == ERROR:
                done_event.set()

    for f in flat:
        f.add_done_callback(on_done)
    if flat and not done_event.wait(timeout):
        if return_when == "ALL_COMPLETED":
            raise TimeoutError("%d futures not done after %s s" % (len(pending), timeout))
    done = {f for f in flat if f.done()}
    return concurrent.futures._base.DoneAndNotDoneFutures(done, set(flat) - done)


async def _wait(flat, timeout=None, return_when="ALL_COMPLETED"):
    tasks = [asyncio.ensure_future(f._state.wait()) for f in flat]
    if tasks:
        when = {"ALL_COMPLETED": asyncio.ALL_COMPLETED, "FIRST_COMPLETED": asyncio.FIRST_COMPLETED,
                "FIRST_EXCEPTION": asyncio.ALL_COMPLETED}[return_when]
        await asyncio.wait(tasks, timeout=timeout, return_when=when)
    done = {f for f in flat if f.done()}
    return concurrent.futures._base.DoneAndNotDoneFutures(done, set(flat) - done)


def futures_of(obj):
    """Every Future inside ``obj``: nested lists, tuples, sets, dict values,
    and the graphs of dask collections (persisted ones hold futures)."""
    from dask._task_spec import Alias, DataNode

    out, seen, stack = [], set(), [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, Future):
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, DataNode):
            stack.append(x.value)
        elif isinstance(x, Alias):
            continue
        elif hasattr(x, "__dask_graph__") and hasattr(x, "__dask_keys__"):
            try:
                stack.extend(dict(x.__dask_graph__()).values())
            except (TypeError, ValueError, AttributeError):
                continue
    return out[::-1]
