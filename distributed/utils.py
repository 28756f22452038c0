"""Small helpers shared by the servers and the executor (no state, no I/O)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import traceback
from collections import OrderedDict

from dask._task_spec import TaskRef

logger = logging.getLogger(__name__)


class TaskError(Exception):
    """Stands in for a task's exception that could not be pickled; its
    message is the original's type and text."""


class LRU(OrderedDict):
    """A dict that keeps only the ``maxsize`` most recently set items.

    >>> d = LRU(2); d['a'] = 1; d['b'] = 2; d['c'] = 3
    >>> list(d)
    ['b', 'c']
    """

    def __init__(self, maxsize):
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > self.maxsize:
            self.popitem(last=False)


def sizeof(obj) -> int:
    from dask.sizeof import sizeof as _sizeof

    return int(_sizeof(obj))


def format_exception_text(e: BaseException) -> str:
    """The traceback of ``e`` as text, without the worker's own frame."""
    lines = traceback.format_exception(type(e), e, e.__traceback__)
    return "".join(line for line in lines if "distributed/worker.py" not in line)


def substitute_refs(obj, values):
    """Replace every ``TaskRef`` inside lists, tuples, sets and dict values
    by its value.

    >>> substitute_refs([TaskRef('x'), (1, {'a': TaskRef('y')})], {'x': 10, 'y': 20})
    [10, (1, {'a': 20})]
    """
    typ = type(obj)
    if isinstance(obj, TaskRef):
        return values[obj.key]
    if typ is list:
        return [substitute_refs(o, values) for o in obj]
    if typ is tuple:
        return tuple(substitute_refs(o, values) for o in obj)
    if typ is dict:
        return {k: substitute_refs(v, values) for k, v in obj.items()}
    if typ in (set, frozenset):
        return typ(substitute_refs(o, values) for o in obj)
    return obj


def find_refs(obj, out):
    """Collect (into the list ``out``) every TaskRef inside lists, tuples,
    sets and dict values; returns ``out``.

    >>> [r.key for r in find_refs([1, (TaskRef('x'),), {'k': TaskRef('y')}], [])]
    ['x', 'y']
    """
    typ = type(obj)
    if typ in (int, float, str, bytes, bool) or obj is None:
        return out
    if isinstance(obj, TaskRef):
        out.append(obj)
    elif typ in (list, tuple, set, frozenset):
        for o in obj:
            find_refs(o, out)
    elif typ is dict:
        for o in obj.values():
            find_refs(o, out)
    return out


def funcname(func) -> str:
    """A short name for a function, for keys.

    >>> funcname(len)
    'len'
    >>> funcname(lambda x: x)
    'lambda'
    """
    from dask.utils import funcname as _funcname

    name = _funcname(func)
    return "lambda" if name == "<lambda>" else name


def sync(loop, func, *args, timeout=None, **kwargs):
    """Run coroutine function ``func`` on ``loop`` (running in another
    thread) and wait for its result, at most ``timeout`` seconds.

    Raises the coroutine's exception; ``TimeoutError`` (the builtin) if time
    runs out; ``RuntimeError`` if called from the loop's own thread, where
    waiting would deadlock.
    """
    if loop_is_current_thread(loop):
        raise RuntimeError("A blocking method was called from the executor's own event loop; "
                           "use the coroutine form (e.g. `await executor._gather(...)`).")
    fut = asyncio.run_coroutine_threadsafe(func(*args, **kwargs), loop)
    try:
        return fut.result(timeout)
    except TimeoutError:
        fut.cancel()
        raise TimeoutError("operation timed out after %s s" % timeout) from None
    except asyncio.CancelledError as e:
        # asyncio's CancelledError is a BaseException; callers of blocking
        # methods expect the Exception that concurrent.futures raises
        raise concurrent.futures.CancelledError(*e.args) from None
    finally:
        # the future holds the exception, whose traceback holds this frame
        del fut


_loop_threads = {}


def loop_is_current_thread(loop) -> bool:
    return _loop_threads.get(id(loop)) == threading.get_ident()


def register_loop_thread(loop):
    _loop_threads[id(loop)] = threading.get_ident()


def unregister_loop_thread(loop):
    _loop_threads.pop(id(loop), None)


_libc = []


def trim_memory() -> bool:
    """Hand freed heap memory back to the operating system (glibc only).

    After a large graph is forgotten, CPython has freed its objects but
    glibc keeps the pages mapped, so a scheduler that held 100,000 tasks
    stays at ~300 MB RSS without this.  Returns whether a trim was done.
    """
    if not _libc:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.append(lib.malloc_trim)
        except (OSError, AttributeError):
            _libc.append(None)
    trim = _libc[0]
    if trim is None:
        return False
    trim(0)
    return True
