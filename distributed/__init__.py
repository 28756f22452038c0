"""distributed: run Python functions and dask graphs on a cluster.

>>> from distributed import Executor          # doctest: +SKIP
>>> e = Executor()                             # a local cluster   # doctest: +SKIP
>>> e.gather(e.map(lambda x: x + 1, range(3)))                     # doctest: +SKIP
[1, 2, 3]
"""
from .executor import (CancelledError, Client, Executor, Future, KilledWorker, as_completed,
                       default_client, futures_of, get_client, wait)
from .nanny import Nanny
from .scheduler import Scheduler
from .worker import Worker, get_worker

from . import _dask_compat

__version__ = "0.1.0"

_dask_compat.install()

__all__ = ["Executor", "Client", "Future", "as_completed", "wait", "futures_of", "get_client",
           "default_client", "get_worker", "CancelledError", "KilledWorker", "Scheduler", "Worker",
           "Nanny",
           "__version__"]
