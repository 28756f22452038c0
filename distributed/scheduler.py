"""The scheduler server: one event loop moving messages into and out of
:class:`~distributed.scheduler_state.SchedulerState`.

Each worker and each executor keeps one long-lived batched stream to it
(``register-worker`` / ``register-client``).  Messages read from a stream
become stimuli; the messages the state machine returns are queued on the
streams of their recipients.  One-off questions (``who-has``, ``ncores``,
``identity``) are ordinary request/reply handlers.

The server also owns what needs a clock: a worker that has sent nothing for
``heartbeat_timeout`` seconds (for instance one stopped with SIGSTOP, whose
connection stays open) is removed as if its connection had dropped.

State beyond the SchedulerState:

* ``worker_streams``: worker address -> BatchedSend
* ``client_streams``: client id -> BatchedSend
* ``last_seen``: worker address -> loop time of its last message
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

from .batched import BatchedSend
from .comm import CommClosedError
from .core import NO_REPLY, ConnectionPool, RemoteError, Server
from .protocol import ProtocolError
from .scheduler_state import SchedulerState
from .utils import LRU, trim_memory

TRIM_AFTER_FORGETTING = 10000  # tasks
REPLICATE_NBYTES = 1 << 20      # results up to this size get a second copy ...
REPLICATE_FOR = 60.0            # ... for this many seconds after a worker died

logger = logging.getLogger(__name__)


class Scheduler(Server):
    """Parameters: ``host``/``port`` to listen on (port 0: any free port),
    ``heartbeat_timeout`` seconds of silence after which a worker is
    presumed hung, ``allowed_failures`` worker deaths a task may cause
    before it errs with KilledWorker, ``validate`` to check every invariant
    after every stimulus (for tests)."""

    def __init__(self, host="127.0.0.1", port=8786, heartbeat_timeout=30.0,
                 allowed_failures=3, validate=False, restart_timeout=60.0):
        handlers = {
            "register-worker": self.handle_register_worker,
            "register-client": self.handle_register_client,
            "who-has": self.handle_who_has,
            "has-what": self.handle_has_what,
            "ncores": self.handle_ncores,
            "processing": self.handle_processing,
            "scheduler-info": self.handle_scheduler_info,
        }
        super().__init__(handlers, name="scheduler")
        self.host = host
        self.port = port
        self.state = SchedulerState(allowed_failures=allowed_failures, validate=validate)
        self.validate = validate
        self.heartbeat_timeout = heartbeat_timeout
        self.restart_timeout = restart_timeout
        self.worker_streams = {}
        self.client_streams = {}
        self.last_seen = {}
        self._functions = LRU(1000)
        self.pool = ConnectionPool(limit=64)
        self._tasks = set()
        self._restarting = False
        self._replicate_until = 0.0
        self.worker_stream_ops = {
            "task-finished": self._worker_task_finished,
            "task-erred": self._worker_task_erred,
            "missing-data": self._worker_missing_data,
            "add-keys": self._worker_add_keys,
            "release-worker-data": self._worker_release_data,
            "heartbeat": self._worker_heartbeat,
            "worker-paused": self._worker_paused,
        }
        self.client_stream_ops = {
            "update-graph": self._client_update_graph,
            "client-releases-keys": self._client_op(self.state.stimulus_client_releases_keys),
            "client-desires-keys": self._client_op(self.state.stimulus_client_desires_keys),
            "cancel-keys": self._client_op(self.state.stimulus_cancel_keys),
            "replicate": self._client_op(self.state.stimulus_replicate),
            "restart": self._client_restart,
            "heartbeat": self._client_heartbeat,
        }

    def __repr__(self):
        return "<Scheduler %s: %d workers, %d tasks>" % (
            self.address, len(self.state.workers), len(self.state.tasks))

    async def start(self):
        await self.listen("tcp://%s:%d" % (self.host, self.port))
        self.loop = asyncio.get_running_loop()
        self._spawn(self._check_heartbeats())
        logger.info("scheduler at %s", self.address)
        return self

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self):
        if self.status == "closed":
            return
        self.status = "closed"
        self.stop_listening()
        for bs in list(self.worker_streams.values()) + list(self.client_streams.values()):
            bs.abort()
        for task in list(self._tasks):
            task.cancel()
        self.close_comms()
        self.pool.close()

    # ------------------------------------------------------------ sending
    def send_all(self, out):
        to_workers, to_clients = out
        for addr, msgs in to_workers.items():
            bs = self.worker_streams.get(addr)
            if bs is not None and not bs.closing:
                bs.send(*msgs)
        for client, msgs in to_clients.items():
            bs = self.client_streams.get(client)
            if bs is not None and not bs.closing:
                bs.send(*msgs)

    def _stimulus(self, func, *args, **kwargs):
        """Run a stimulus, send what it returns.  A bug in the state machine
        is logged with the stimulus that caused it, and re-raised in
        validate mode; the server keeps serving other connections."""
        try:
            out = func(*args, **kwargs)
        except TypeError:
            raise  # wrong fields in a message: the caller drops that connection
        except Exception:
            logger.exception("scheduler: %s%r failed", func.__name__, args[:2])
            if self.validate:
                raise
            return
        self.send_all(out)

    async def _read_stream(self, comm, ops, name, **fixed):
        """Read batches from a stream and dispatch each message."""
        while True:
            try:
                msgs = await comm.read()
            except (CommClosedError, ProtocolError) as e:
                if isinstance(e, ProtocolError):
                    self._bad(comm, e)
                return
            if not isinstance(msgs, list):
                msgs = [msgs]
            for msg in msgs:
                if not isinstance(msg, dict):
                    self._bad(comm, "stream message is not a dict")
                    comm.abort()
                    return
                op = msg.pop("op", None)
                if op == "unregister" or op == "close-client":
                    return op
                handler = ops.get(op)
                if handler is None:
                    self._bad(comm, "unknown stream op %.60r from %s" % (op, name))
                    comm.abort()
                    return
                try:
                    handler(**fixed, **msg)
                except TypeError as e:
                    self._bad(comm, "bad fields in %r: %s" % (op, e))
                    comm.abort()
                    return

    # ------------------------------------------------------------ workers
    async def handle_register_worker(self, comm, address, nthreads=1, name=None, nanny=None,
                                     memory_limit=0, keys=None):
        if address in self.state.workers:
            await comm.write({"status": "error", "text": "a worker at %s is already registered" % address})
            return NO_REPLY
        if name is not None:
            for ws in list(self.state.workers.values()):
                if ws.name != name:
                    continue
                if nanny is not None and ws.nanny == nanny:
                    # its nanny replaced it faster than we noticed it died
                    self._remove_worker(ws.address)
                    continue
                await comm.write({"status": "error",
                                  "text": "a worker named %r is already registered" % name})
                return NO_REPLY
        await comm.write({"status": "OK", "address": self.address})
        bs = BatchedSend(interval=0.0005, name="scheduler->%s" % address)
        bs.start(comm)
        self.worker_streams[address] = bs
        self.last_seen[address] = self.loop.time()
        logger.info("worker joined: %s (%s threads)", address, nthreads)
        self._stimulus(self.state.stimulus_add_worker, address, nthreads, name, nanny,
                       memory_limit, self.loop.time(), keys)
        reason = None
        try:
            reason = await self._read_stream(comm, self.worker_stream_ops, address,
                                             worker=address)
        finally:
            self._remove_worker(address, bs, died=reason != "unregister")
        return NO_REPLY

    def _remove_worker(self, address, bs=None, died=True):
        current = self.worker_streams.get(address)
        if bs is not None and current is not bs:
            return  # a newer registration of the same address
        self.worker_streams.pop(address, None)
        self.last_seen.pop(address, None)
        if current is not None:
            current.abort()
        if address in self.state.workers:
            logger.info("worker left: %s", address)
            if died and not self._restarting:
                self._worker_died()
            # first, so that fetches from a hung worker stop before its
            # work is reassigned
            msg = {"op": "worker-removed", "worker": address}
            for bs in list(self.client_streams.values()) + list(self.worker_streams.values()):
                if not bs.closing:
                    bs.send(msg)
            self._stimulus(self.state.stimulus_remove_worker, address)

    def _worker_died(self):
        """Workers are dying: keep a second copy of small results for a while
        (see ``SchedulerState._replicate``), so that each further death costs
        only what was running, not the results it held."""
        if not self.state.replicate_nbytes:
            logger.info("a worker died: keeping a second copy of results up to %d bytes "
                        "for the next %.0f s", REPLICATE_NBYTES, REPLICATE_FOR)
        self.state.replicate_nbytes = REPLICATE_NBYTES
        self._replicate_until = self.loop.time() + REPLICATE_FOR

    def _worker_task_finished(self, worker, key, run_id, nbytes=-1, type=None, data=None):
        self.last_seen[worker] = self.loop.time()
        self._stimulus(self.state.stimulus_task_finished, key, worker, run_id, nbytes, type, data)

    def _worker_task_erred(self, worker, key, run_id, exception=None, traceback=None):
        self.last_seen[worker] = self.loop.time()
        self._stimulus(self.state.stimulus_task_erred, key, worker, run_id, exception, traceback)

    def _worker_missing_data(self, worker, key, run_id, missing):
        self._stimulus(self.state.stimulus_missing_data, key, worker, run_id, missing)

    def _worker_add_keys(self, worker, keys):
        self._stimulus(self.state.stimulus_add_keys, worker, keys)

    def _worker_release_data(self, worker, keys):
        self._stimulus(self.state.stimulus_release_worker_data, worker, keys)

    def _worker_paused(self, worker, paused):
        self.last_seen[worker] = self.loop.time()
        self._stimulus(self.state.stimulus_worker_paused, worker, paused)

    def _worker_heartbeat(self, worker, **info):
        self.last_seen[worker] = self.loop.time()

    async def _check_heartbeats(self):
        peak = 0
        while self.status == "running":
            await asyncio.sleep(min(1.0, self.heartbeat_timeout / 4))
            now = self.loop.time()
            # give memory back once many tasks have been forgotten
            ntasks = len(self.state.tasks)
            peak = max(peak, ntasks)
            if peak - ntasks > TRIM_AFTER_FORGETTING:
                trim_memory()
                peak = ntasks
            if self.state.replicate_nbytes and now > self._replicate_until:
                self.state.replicate_nbytes = 0
                logger.info("no worker died for %.0f s: results are kept once again",
                            REPLICATE_FOR)
            for addr, seen in list(self.last_seen.items()):
                if now - seen > self.heartbeat_timeout:
                    logger.warning("worker %s sent nothing for %.0f s: presumed hung, removing it",
                                   addr, now - seen)
                    self._remove_worker(addr)

    # ------------------------------------------------------------ clients
    async def handle_register_client(self, comm, client):
        await comm.write({"status": "OK", "address": self.address})
        bs = BatchedSend(interval=0.0005, name="scheduler->client")
        bs.start(comm)
        old = self.client_streams.pop(client, None)
        if old is not None:
            old.abort()
        self.client_streams[client] = bs
        self._stimulus(self.state.stimulus_add_client, client)
        try:
            await self._read_stream(comm, self.client_stream_ops, "client %s" % client, client=client)
        finally:
            if self.client_streams.get(client) is bs:
                del self.client_streams[client]
                bs.abort()
                self._stimulus(self.state.stimulus_remove_client, client)
        return NO_REPLY

    def _client_op(self, stimulus):
        def op(**kwargs):
            self._stimulus(stimulus, **kwargs)
        return op

    def _client_update_graph(self, client, tasks, **kwargs):
        # tasks of one map share their function: keep one copy of its bytes
        cache = self._functions
        for spec in tasks.values():
            if type(spec) is dict:
                f = spec.get("function")
                if f is not None:
                    shared = cache.get(f)
                    if shared is None:
                        cache[f] = f
                    else:
                        spec["function"] = shared
        self._stimulus(self.state.stimulus_update_graph, client, tasks, **kwargs)

    def _client_heartbeat(self, client):
        pass

    def _client_restart(self, client, id=None):
        self._spawn(self._restart(client, id))

    async def _restart(self, client, request_id):
        """Forget all tasks, restart every worker, reply when they are back."""
        n_workers = len(self.state.workers)
        nannies = [ws.nanny for ws in self.state.workers.values() if ws.nanny]
        bare = [ws.address for ws in self.state.workers.values() if not ws.nanny]
        self._stimulus(self.state.stimulus_restart)
        for addr in bare:
            bs = self.worker_streams.get(addr)
            if bs is not None and not bs.closing:
                bs.send({"op": "clear"})
        status, text = "OK", ""
        self._restarting = True  # the workers the nannies kill now did not die
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *[self.pool.rpc(n).restart(timeout=self.restart_timeout) for n in nannies],
                return_exceptions=True), self.restart_timeout)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                status, text = "error", "%d of %d workers failed to restart: %s" % (
                    len(failed), len(nannies), failed[0])
            loop = self.loop
            deadline = loop.time() + self.restart_timeout
            while len(self.state.workers) < n_workers and loop.time() < deadline and status == "OK":
                await asyncio.sleep(0.01)
            if len(self.state.workers) < n_workers and status == "OK":
                status, text = "error", "only %d of %d workers came back after restart" % (
                    len(self.state.workers), n_workers)
        except asyncio.TimeoutError:
            status, text = "error", "restart timed out after %s s" % self.restart_timeout
        except (OSError, CommClosedError, RemoteError) as e:
            status, text = "error", "restart failed: %s" % e
        finally:
            self._restarting = False
        bs = self.client_streams.get(client)
        if bs is not None and not bs.closing:
            bs.send({"op": "restart-done", "id": request_id, "status": status, "text": text})

    # ------------------------------------------------------------ queries
    async def handle_who_has(self, comm, keys=None):
        return self.state.who_has(keys)

    async def handle_has_what(self, comm):
        return self.state.has_what()

    async def handle_ncores(self, comm):
        return {addr: ws.nthreads for addr, ws in self.state.workers.items()}

    async def handle_processing(self, comm):
        return self.state.processing()

    async def handle_scheduler_info(self, comm):
        return {
            "address": self.address,
            "workers": {addr: {"nthreads": ws.nthreads, "name": ws.name, "nanny": ws.nanny,
                               "nbytes": ws.nbytes, "processing": len(ws.processing),
                               "in_memory": len(ws.has_what)}
                        for addr, ws in self.state.workers.items()},
            "tasks": len(self.state.tasks),
            "task_states": dict(Counter(ts.state for ts in self.state.tasks.values())),
            "clients": len(self.state.clients),
            "bad_messages": self.bad_messages,
        }
