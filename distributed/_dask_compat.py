"""What this package changes in dask when it is imported.

1. Defaults: dataframe shuffles and array rechunks use the ``tasks`` method.
   dask picks its ``p2p`` method whenever a default client exists, and p2p
   needs worker extensions this package does not have.  User config wins.
2. The ``get=`` keyword.  The seed of this project computed collections with
   ``x.compute(get=executor.get)``; dask has since removed ``get=`` in favour
   of ``scheduler=``.  :func:`install` wraps ``dask.base.get_scheduler`` (and
   ``dask.base.persist`` / ``dask.persist``, which have no ``get`` parameter
   and would otherwise silently compute locally) so that ``get=fn`` means
   ``scheduler=fn``, with one ``GetKeywordWarning`` per process.  Giving both
   raises TypeError, as does any conflicting use.

Calling :func:`install` twice changes nothing.  ``from dask import persist``
run before ``import distributed`` keeps dask's own function.
"""
from __future__ import annotations

import functools
import sys
import warnings

_MARK = "_distributed_get_shim"
_warned = []


class GetKeywordWarning(FutureWarning):
    """``get=`` is accepted for compatibility; ``scheduler=`` is the current
    spelling.  (A FutureWarning, because DeprecationWarnings raised inside
    dask are hidden by default.)"""


def _warn_once():
    if not _warned:
        _warned.append(True)
        warnings.warn("compute(get=...) is kept for compatibility; use scheduler=... instead",
                      GetKeywordWarning, stacklevel=_callers_level())


def _callers_level():
    """The ``stacklevel`` of the first frame outside dask and this package,
    so that the warning names the user's line (x.compute(get=...) goes
    through a different depth of dask calls than dask.compute)."""
    frame = sys._getframe(2)  # _warn_once's caller: stacklevel 2 of its warn()
    level = 2
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "dask" or name.startswith(("dask.", "distributed"))):
            return level
        frame = frame.f_back
        level += 1
    return 2


def _merge_get(get, scheduler):
    if get is not None:
        if scheduler is not None:
            raise TypeError("Give either get= or scheduler=, not both")
        _warn_once()
        return get
    return scheduler


def install():
    import dask
    import dask.base

    dask.config.update_defaults({"dataframe": {"shuffle": {"method": "tasks"}},
                                 "array": {"rechunk": {"method": "tasks"}}})
    original = dask.base.get_scheduler
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_scheduler(get=None, scheduler=None, collections=None, cls=None):
        scheduler = _merge_get(get, scheduler)
        if scheduler is None and not dask.config.get("scheduler", None):
            config_get = dask.config.get("get", None)
            if config_get is not None:
                _warn_once()
                with dask.config.set(get=None):
                    return original(scheduler=config_get, collections=collections, cls=cls)
        return original(scheduler=scheduler, collections=collections, cls=cls)

    setattr(get_scheduler, _MARK, True)
    dask.base.get_scheduler = get_scheduler

    original_persist = dask.base.persist

    @functools.wraps(original_persist)
    def persist(*args, get=None, scheduler=None, **kwargs):
        return original_persist(*args, scheduler=_merge_get(get, scheduler), **kwargs)

    setattr(persist, _MARK, True)
    dask.base.persist = persist
    if getattr(dask, "persist", None) is original_persist:
        dask.persist = persist
