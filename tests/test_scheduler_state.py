"""State-layer tests of distributed.scheduler_state: stimuli in, exact
messages out, invariants validated after every step.  No loop, no sockets.

The last part runs whole graphs through :class:`FakeCluster`, which joins one
SchedulerState and several worker WorkerStates with an in-memory queue.
"""
import doctest
from collections import deque

import pytest

from distributed.scheduler_state import (
    ERRED,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    QUEUED,
    RELEASED,
    WAITING,
    SchedulerState,
    TaskState,
    WorkerState,
    decide_worker,
)
from distributed.worker_state import WorkerState as WState

A, B, C = "tcp://10.0.0.1:8000", "tcp://10.0.0.2:8000", "tcp://10.0.0.3:8000"
NOTHING = ({}, {})


class CheckedSchedulerState(SchedulerState):
    """Validates every invariant after every stimulus, including the ones
    (stale reports) that do not go through a transition."""

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if not name.startswith("stimulus_"):
            return attr

        def checked(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.validate_state()
            return out

        return checked


def new_state(*workers, **kwargs):
    s = CheckedSchedulerState(validate=True, **kwargs)
    for addr in workers:
        assert s.stimulus_add_worker(addr) == NOTHING
    return s


def compute_task(key, run_spec, run_id, priority, who_has=None, nbytes=None, report=True):
    """The exact ``compute-task`` message the scheduler should send."""
    return {
        "op": "compute-task", "key": key, "run_spec": run_spec, "priority": priority,
        "run_id": run_id, "who_has": who_has or {}, "nbytes": nbytes or {}, "report": report,
    }


def in_memory(key, worker, nbytes=8, type="int"):
    return {"op": "key-in-memory", "key": key, "nbytes": nbytes, "type": type,
            "workers": [worker]}


def free_keys(*keys):
    return {"op": "free-keys", "keys": list(keys)}


def erred(key, exception, traceback=None):
    return {"op": "task-erred", "key": key, "exception": exception, "traceback": traceback}


def states(s):
    return {key: ts.state for key, ts in s.tasks.items()}


# ---------------------------------------------------------------- decide_worker
def test_decide_worker_doctest():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(decide_worker, "decide_worker",
                            globs={"WorkerState": WorkerState, "TaskState": TaskState,
                                   "decide_worker": decide_worker}):
        runner.run(test)
    assert runner.failures == 0
    assert runner.tries >= 5


def test_decide_worker_prefers_least_busy_per_thread_then_least_data():
    alice, bob, carol = WorkerState("alice", nthreads=4), WorkerState("bob"), WorkerState("carol")
    alice.processing = {TaskState("a1"), TaskState("a2")}  # 0.5 per thread
    bob.processing = {TaskState("b1")}  # 1 per thread
    assert decide_worker(TaskState("t"), [alice, bob, carol]) is carol
    carol.processing = {TaskState("c1")}
    assert decide_worker(TaskState("t"), [alice, bob, carol]) is alice
    # equal load: least data
    alice.processing, bob.processing, carol.processing = set(), set(), set()
    alice.nbytes, bob.nbytes, carol.nbytes = 30, 10, 20
    assert decide_worker(TaskState("t"), [alice, bob, carol]) is bob


def test_decide_worker_moves_fewest_bytes_and_respects_valid_and_empty():
    alice, bob = WorkerState("alice"), WorkerState("bob")
    big, small = TaskState("big"), TaskState("small")
    big.nbytes, small.nbytes = 10_000, 10
    big.who_has, small.who_has = {alice}, {bob}
    t = TaskState("t")
    t.dependencies = {big, small}
    bob.processing = {TaskState("busy1"), TaskState("busy2")}
    assert decide_worker(t, [alice, bob]) is alice
    assert decide_worker(t, [alice, bob], valid={bob}) is bob
    assert decide_worker(t, [alice, bob], valid=set()) is None
    assert decide_worker(t, []) is None


# ---------------------------------------------------------------- basic flow
def test_single_task_goes_to_least_busy_worker():
    s = new_state(A, B)
    assert s.stimulus_update_graph("c", {"busy": "f-busy"}, {}, ["busy"]) == (
        {A: [compute_task("busy", "f-busy", 1, (0, 1, 0))]}, {})
    out = s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"], priority={"x": 7},
                                  user_priority=2)
    assert out == ({B: [compute_task("x", "f-x", 2, (-2, 2, 7))]}, {})
    assert s.tasks["x"].state == PROCESSING
    assert s.tasks["x"].processing_on is s.workers[B]
    assert s.processing() == {A: ["busy"], B: ["x"]}


def test_dependent_runs_on_worker_holding_its_dependency():
    s = new_state(A, B)
    assert s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"]) == (
        {A: [compute_task("x", "f-x", 1, (0, 1, 0), report=False)]}, {})
    assert states(s) == {"x": PROCESSING, "y": WAITING}
    # make A the busier worker: y must still go where x is
    s.stimulus_update_graph("c", {"other": "f-o"}, {}, ["other"], restrictions={"other": [A]})
    assert s.stimulus_task_finished("x", A, 1, nbytes=8, type="int") == (
        {A: [compute_task("y", "f-y", 3, (0, 1, 0), who_has={"x": [A]}, nbytes={"x": 8})]},
        {})
    assert states(s) == {"x": MEMORY, "y": PROCESSING, "other": PROCESSING}
    assert s.who_has(["x"]) == {"x": [A]}
    assert s.has_what() == {A: ["x"], B: []}
    assert s.workers[A].nbytes == 8


def test_task_finished_reports_to_client_and_releases_unwanted_dependency():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    assert s.stimulus_task_finished("y", A, 2, nbytes=16, type="list") == (
        {A: [free_keys("x")]}, {"c": [in_memory("y", A, nbytes=16, type="list")]})
    # x keeps its run_spec so that y could be recomputed from it
    assert states(s) == {"x": RELEASED, "y": MEMORY}
    assert s.tasks["x"].run_spec == "f-x"
    assert s.who_has() == {"x": [], "y": [A]}
    assert s.workers[A].nbytes == 16


def test_shared_dependency_held_until_last_dependent_finishes():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y", "z": "f-z"},
                            {"y": ["x"], "z": ["x"]}, ["y", "z"])
    out = s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    assert sorted(m["key"] for m in out[0][A]) == ["y", "z"]
    run_ids = {m["key"]: m["run_id"] for m in out[0][A]}
    assert s.stimulus_task_finished("y", A, run_ids["y"], nbytes=8, type="int") == (
        {}, {"c": [in_memory("y", A)]})
    assert s.tasks["x"].state == MEMORY
    assert s.stimulus_task_finished("z", A, run_ids["z"], nbytes=8, type="int") == (
        {A: [free_keys("x")]}, {"c": [in_memory("z", A)]})
    assert s.tasks["x"].state == RELEASED


def test_client_release_frees_data_and_forgets_tasks():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_task_finished("y", A, 2, nbytes=8, type="int")
    assert s.stimulus_client_releases_keys("c", ["y"]) == ({A: [free_keys("y")]}, {})
    assert s.tasks == {}
    assert s.has_what() == {A: []}
    assert s.workers[A].nbytes == 0
    assert s.clients["c"].wants_what == set()
    # releasing again, or an unknown key, is a no-op
    assert s.stimulus_client_releases_keys("c", ["y", "nope"]) == NOTHING


def test_release_of_waiting_and_processing_tasks_frees_worker_and_forgets():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"])
    assert states(s) == {"x": PROCESSING, "y": WAITING}
    assert s.stimulus_client_releases_keys("c", ["y"]) == ({A: [free_keys("x")]}, {})
    assert s.tasks == {}
    assert s.processing() == {A: []}


def test_key_wanted_again_while_in_memory_is_reported_at_once():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    assert s.stimulus_client_desires_keys("d", ["x", "unknown"]) == (
        {}, {"d": [in_memory("x", A), {"op": "cancelled-keys", "keys": ["unknown"]}]})


# ---------------------------------------------------------------- queue of root tasks
def keys_sent(to_workers, addr):
    return [m["key"] for m in to_workers.get(addr, []) if m["op"] == "compute-task"]


def test_tasks_without_dependencies_beyond_saturation_wait_in_the_queue():
    s = new_state(A, saturation=2)
    tasks = {"t%d" % i: "f" for i in range(5)}
    to_workers, _ = s.stimulus_update_graph("c", tasks, {}, list(tasks),
                                            priority={"t%d" % i: i for i in range(5)})
    assert keys_sent(to_workers, A) == ["t0", "t1"]
    assert states(s) == {"t0": PROCESSING, "t1": PROCESSING, "t2": QUEUED, "t3": QUEUED,
                         "t4": QUEUED}
    # a finished task frees a slot: the queued task of highest priority goes
    to_workers, _ = s.stimulus_task_finished("t1", A, s.tasks["t1"].run_id, nbytes=8)
    assert keys_sent(to_workers, A) == ["t2"]
    # so does an erred one
    to_workers, _ = s.stimulus_task_erred("t0", A, s.tasks["t0"].run_id, exception="e")
    assert keys_sent(to_workers, A) == ["t3"]


def test_worker_that_joins_takes_queued_tasks_at_once():
    s = new_state(A, saturation=1)
    s.stimulus_update_graph("c", {"x": "f", "y": "f", "z": "f"}, {}, ["x", "y", "z"],
                            priority={"x": 0, "y": 1, "z": 2})
    assert states(s) == {"x": PROCESSING, "y": QUEUED, "z": QUEUED}
    to_workers, _ = s.stimulus_add_worker(B)
    assert keys_sent(to_workers, B) == ["y"]
    # a paused worker gets nothing from the queue until it resumes
    s.stimulus_worker_paused(A, True)
    to_workers, _ = s.stimulus_task_finished("x", A, s.tasks["x"].run_id, nbytes=8)
    assert keys_sent(to_workers, A) == [] and s.tasks["z"].state == QUEUED
    to_workers, _ = s.stimulus_worker_paused(A, False)
    assert keys_sent(to_workers, A) == ["z"]


def test_queued_task_released_by_its_client_is_forgotten_and_never_sent():
    s = new_state(A, saturation=1)
    s.stimulus_update_graph("c", {"x": "f", "y": "f"}, {}, ["x", "y"],
                            priority={"x": 0, "y": 1})
    assert s.tasks["y"].state == QUEUED
    assert s.stimulus_client_releases_keys("c", ["y"]) == NOTHING
    assert "y" not in s.tasks
    to_workers, _ = s.stimulus_task_finished("x", A, s.tasks["x"].run_id, nbytes=8)
    assert keys_sent(to_workers, A) == []
    assert s.queued == []


def test_tasks_with_dependencies_or_restrictions_are_never_queued():
    s = new_state(A, saturation=1)
    s.stimulus_update_graph("c", {"x": "f"}, {}, ["x"])
    # A is full, but a restricted task goes to its worker all the same
    s.stimulus_update_graph("c", {"pinned": "f"}, {}, ["pinned"], restrictions={"pinned": [A]})
    s.stimulus_update_graph("c", {"r": "f"}, {}, ["r"])
    assert states(s) == {"x": PROCESSING, "pinned": PROCESSING, "r": QUEUED}
    s.stimulus_task_finished("x", A, s.tasks["x"].run_id, nbytes=8)
    assert s.tasks["r"].state == QUEUED  # pinned still fills A
    # and so does a task that needs data: it goes where its data is
    s.stimulus_update_graph("c", {"y": "f"}, {"y": ["x"]}, ["y"])
    assert s.tasks["y"].state == PROCESSING
    s.stimulus_task_finished("pinned", A, s.tasks["pinned"].run_id, nbytes=8)
    s.stimulus_task_finished("y", A, s.tasks["y"].run_id, nbytes=8)
    assert s.tasks["r"].state == PROCESSING
    # the only worker dies: nothing can run, and nothing stays queued
    s.stimulus_remove_worker(A)
    assert states(s) == {"x": NO_WORKER, "y": WAITING, "pinned": NO_WORKER, "r": NO_WORKER}
    to_workers, _ = s.stimulus_add_worker(B)
    assert keys_sent(to_workers, B) == ["x"]  # submitted first; B is then full
    assert s.tasks["r"].state == QUEUED


# ---------------------------------------------------------------- errors
def test_erred_task_spreads_to_dependents_and_exception_is_forwarded_unchanged():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y", "z": "f-z"},
                            {"y": ["x"], "z": ["y"]}, ["z"])
    exc = object()  # opaque: the scheduler must not look inside
    out = s.stimulus_task_erred("x", A, 1, exception=exc, traceback="Traceback ...")
    assert out == ({}, {"c": [erred("z", exc, "Traceback ...")]})
    assert out[1]["c"][0]["exception"] is exc
    assert states(s) == {"x": ERRED, "y": ERRED, "z": ERRED}
    assert s.tasks["z"].exception_blame is s.tasks["x"]
    assert s.processing() == {A: []}


def test_client_wanting_erred_key_later_is_told_at_once():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    s.stimulus_task_erred("x", A, 1, exception="E", traceback="T")
    assert s.stimulus_update_graph("d", {"x": "f-x"}, {}, ["x"]) == ({}, {"d": [erred("x", "E", "T")]})


def test_release_erred_key_forgets_it_so_resubmit_runs_again():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.stimulus_task_erred("x", A, 1, exception="E", traceback="T") == (
        {}, {"c": [erred("x", "E", "T")]})
    assert s.stimulus_client_releases_keys("c", ["x"]) == NOTHING
    assert s.tasks == {}
    assert s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"]) == (
        {A: [compute_task("x", "f-x", 2, (0, 2, 0))]}, {})


def test_release_erred_dependent_forgets_whole_failed_chain_so_resubmit_runs_again():
    s = new_state(A)
    graph, deps = {"x": "f-x", "y": "f-y"}, {"y": ["x"]}
    s.stimulus_update_graph("c", graph, deps, ["y"])
    assert s.stimulus_task_erred("x", A, 1, exception="E") == ({}, {"c": [erred("y", "E")]})
    assert s.stimulus_client_releases_keys("c", ["y"]) == NOTHING
    assert s.tasks == {}
    assert s.stimulus_update_graph("c", graph, deps, ["y"]) == (
        {A: [compute_task("x", "f-x", 2, (0, 2, 0), report=False)]}, {})
    assert states(s) == {"x": PROCESSING, "y": WAITING}


def test_stale_task_erred_is_ignored():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.stimulus_task_erred("x", A, 99, exception="E") == NOTHING
    assert s.stimulus_task_erred("x", B, 1, exception="E") == NOTHING
    assert s.tasks["x"].state == PROCESSING


def test_retries_rerun_a_failed_task_then_report_the_error():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"], retries={"x": 1})
    assert s.stimulus_task_erred("x", A, 1, exception="E1") == (
        {A: [compute_task("x", "f-x", 2, (0, 1, 0))]}, {})
    assert s.tasks["x"].state == PROCESSING
    assert s.stimulus_task_erred("x", A, 2, exception="E2", traceback="T2") == (
        {}, {"c": [erred("x", "E2", "T2")]})
    assert s.tasks["x"].state == ERRED


def test_missing_dependency_errs_the_task_for_the_client():
    s = new_state(A)
    exception = {"type": "ValueError",
                 "text": "Missing dependency 'x' of 'y': it is not in the graph and not held "
                         "by the cluster"}
    assert s.stimulus_update_graph("c", {"y": "f-y"}, {"y": ["x"]}, ["y"]) == (
        {}, {"c": [erred("y", exception)]})
    # the client still holds a future to y: it stays erred, with its error
    assert s.tasks["y"].state == ERRED
    assert s.tasks["y"].exception == exception
    # another client asking for the same key learns the error; nothing runs
    # y without its dependency
    assert s.stimulus_update_graph("d", {"y": "f-y"}, {"y": ["x"]}, ["y"]) == (
        {}, {"d": [erred("y", exception)]})


def test_missing_dependency_errs_dependents_in_same_graph():
    s = new_state(A)
    out = s.stimulus_update_graph("c", {"y": "f-y", "z": "f-z"}, {"y": ["x"], "z": ["y"]}, ["z"])
    assert out[0] == {}
    assert [m["op"] for m in out[1]["c"]] == ["task-erred"]
    assert out[1]["c"][0]["key"] == "z"
    assert out[1]["c"][0]["exception"]["type"] == "ValueError"
    assert states(s) == {"y": ERRED, "z": ERRED}


# ---------------------------------------------------------------- stale results
def test_stale_task_finished_with_old_run_id_is_ignored_and_freed_by_run_id():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.stimulus_client_releases_keys("c", ["x"]) == ({A: [free_keys("x")]}, {})
    assert s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"]) == (
        {A: [compute_task("x", "f-x", 2, (0, 2, 0))]}, {})
    # the first run's result arrives late: dropped on the worker by run_id only
    assert s.stimulus_task_finished("x", A, 1, nbytes=8, type="int") == (
        {A: [{"op": "free-keys", "keys": ["x"], "run_id": 1}]}, {})
    assert s.tasks["x"].state == PROCESSING
    assert s.stimulus_task_finished("x", A, 2, nbytes=8, type="int") == (
        {}, {"c": [in_memory("x", A)]})
    # a duplicate of the current report changes nothing
    assert s.stimulus_task_finished("x", A, 2, nbytes=8, type="int") == NOTHING
    assert s.who_has() == {"x": [A]}


def test_task_finished_for_forgotten_key_or_unknown_worker():
    s = new_state(A)
    assert s.stimulus_task_finished("ghost", A, 5) == (
        {A: [{"op": "free-keys", "keys": ["ghost"], "run_id": 5}]}, {})
    assert s.stimulus_task_finished("ghost", "tcp://gone:1", 5) == NOTHING


# ---------------------------------------------------------------- workers leaving
def test_remove_worker_reschedules_processing_tasks():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.tasks["x"].processing_on is s.workers[A]
    assert s.stimulus_remove_worker(A) == ({B: [compute_task("x", "f-x", 2, (0, 1, 0))]}, {})
    assert s.tasks["x"].suspicious == 1
    assert list(s.workers) == [B]
    assert s.stimulus_remove_worker(A) == NOTHING


def test_remove_worker_recomputes_lost_keys_still_wanted():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_update_graph("c", {"y": "f-y"}, {"y": ["x"]}, ["y"], restrictions={"y": [A]})
    assert states(s) == {"x": MEMORY, "y": PROCESSING}
    out = s.stimulus_remove_worker(A)
    assert out == ({B: [compute_task("x", "f-x", 3, (0, 1, 0))]},
                   {"c": [{"op": "lost-data", "key": "x"}]})
    assert states(s) == {"x": PROCESSING, "y": WAITING}
    assert s.tasks["y"].waiting_on == {s.tasks["x"]}
    # when x is back, y has nowhere to go (restricted to the dead worker)
    assert s.stimulus_task_finished("x", B, 3, nbytes=8, type="int") == (
        {}, {"c": [in_memory("x", B)]})
    assert states(s) == {"x": MEMORY, "y": NO_WORKER}


def test_remove_worker_keeps_keys_with_a_copy_elsewhere():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    assert s.stimulus_add_keys(B, ["x"]) == NOTHING
    assert s.stimulus_remove_worker(A) == NOTHING
    assert s.tasks["x"].state == MEMORY
    assert s.who_has() == {"x": [B]}
    assert s.workers[B].nbytes == 8


def test_remove_worker_drops_released_dependency_copies_silently():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_task_finished("y", A, 2, nbytes=8, type="int")
    # y is in memory on A and wanted; x was released after y finished
    assert s.stimulus_remove_worker(A) == (
        {B: [compute_task("x", "f-x", 3, (0, 1, 0), report=False)]},
        {"c": [{"op": "lost-data", "key": "y"}]})
    assert states(s) == {"x": PROCESSING, "y": WAITING}


def test_killed_worker_after_allowed_failures_plus_one_deaths():
    s = new_state(A, B, C, allowed_failures=1)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.stimulus_remove_worker(A) == ({B: [compute_task("x", "f-x", 2, (0, 1, 0))]}, {})
    exception = {"type": "KilledWorker",
                 "text": "task 'x' was running on 2 workers that died (the last was %s)" % B}
    assert s.stimulus_remove_worker(B) == ({}, {"c": [erred("x", exception)]})
    assert s.tasks["x"].state == ERRED
    assert s.processing() == {C: []}


def test_suspicion_resets_once_the_worker_lives_on_past_the_task():
    s = new_state(A, B, C, allowed_failures=1)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    s.stimulus_remove_worker(A)
    s.stimulus_task_finished("x", B, 2, nbytes=8, type="int")
    assert s.tasks["x"].suspicious == 1  # its result may yet kill B
    s.stimulus_update_graph("c", {"y": "f-y"}, {}, ["y"], restrictions={"y": [B]})
    s.stimulus_task_finished("y", B, s.tasks["y"].run_id, nbytes=8, type="int")
    assert s.tasks["x"].suspicious == 0


def test_result_that_kills_each_worker_holding_it_ends_in_killed_worker():
    # the task finishes, then its worker dies of holding the result (over
    # its memory limit); recomputing it forever would never end
    s = new_state(A)
    s.stimulus_update_graph("c", {"hog": "f"}, {}, ["hog"])
    for i in range(4):
        s.stimulus_add_worker("w%d" % i)
        ts = s.tasks["hog"]
        holder = ts.processing_on.address
        s.stimulus_task_finished("hog", holder, ts.run_id, nbytes=10**9)
        assert s.tasks["hog"].state == MEMORY
        s.stimulus_remove_worker(holder)
    assert s.tasks["hog"].state == ERRED
    assert s.tasks["hog"].exception["type"] == "KilledWorker"


def test_result_forgiven_once_its_worker_finishes_another_task():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f"}, {}, ["x"], restrictions={"x": [A]})
    s.stimulus_task_finished("x", A, s.tasks["x"].run_id, nbytes=8)
    s.stimulus_update_graph("c", {"y": "f"}, {}, ["y"], restrictions={"y": [A]})
    s.stimulus_task_finished("y", A, s.tasks["y"].run_id, nbytes=8)
    s.stimulus_remove_worker(A)
    # y was the last result A finished; x lived on past y's finish
    assert s.tasks["x"].suspicious == 0 and s.tasks["y"].suspicious == 1


# ---------------------------------------------------------------- clients
def test_two_clients_share_a_key_and_one_release_keeps_it_for_the_other():
    s = new_state(A)
    assert s.stimulus_update_graph("c1", {"x": "f-x"}, {}, ["x"]) == (
        {A: [compute_task("x", "f-x", 1, (0, 1, 0))]}, {})
    # the second submission of the same key does not run it again
    assert s.stimulus_update_graph("c2", {"x": "f-x"}, {}, ["x"]) == NOTHING
    assert s.stimulus_task_finished("x", A, 1, nbytes=8, type="int") == (
        {}, {"c1": [in_memory("x", A)], "c2": [in_memory("x", A)]})
    assert s.stimulus_client_releases_keys("c1", ["x"]) == NOTHING
    assert s.tasks["x"].state == MEMORY
    assert s.stimulus_client_releases_keys("c2", ["x"]) == ({A: [free_keys("x")]}, {})
    assert s.tasks == {}


def test_remove_client_releases_only_its_keys():
    s = new_state(A)
    s.stimulus_update_graph("c1", {"x": "f-x", "y": "f-y"}, {}, ["x", "y"])
    s.stimulus_update_graph("c2", {"y": "f-y"}, {}, ["y"])
    assert s.stimulus_remove_client("c1") == ({A: [free_keys("x")]}, {})
    assert states(s) == {"y": PROCESSING}
    assert list(s.clients) == ["c2"]


def test_cancel_keys_tells_the_client_and_releases():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.stimulus_cancel_keys("c", ["x"]) == (
        {A: [free_keys("x")]}, {"c": [{"op": "cancelled-keys", "keys": ["x"]}]})
    assert s.tasks == {}


# ---------------------------------------------------------------- restrictions
def test_restricted_task_waits_in_no_worker_until_matching_worker_joins():
    s = new_state(A)
    assert s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"], restrictions={"x": [B]}) == NOTHING
    assert s.tasks["x"].state == NO_WORKER
    assert s.unrunnable == {s.tasks["x"]}
    assert s.stimulus_add_worker(C) == NOTHING
    assert s.tasks["x"].state == NO_WORKER
    assert s.stimulus_add_worker(B) == ({B: [compute_task("x", "f-x", 1, (0, 1, 0))]}, {})
    assert s.unrunnable == set()


@pytest.mark.parametrize("restriction", ["bob", "10.0.0.2", B])
def test_restrictions_match_address_name_or_host(restriction):
    s = CheckedSchedulerState(validate=True)
    s.stimulus_add_worker(A, name="alice")
    s.stimulus_add_worker(B, name="bob")
    s.stimulus_update_graph("c", {"busy": "f"}, {}, ["busy"], restrictions={"busy": [B]})
    out = s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"],
                                  restrictions={"x": [restriction]})
    assert list(out[0]) == [B]


def test_restricted_task_released_from_no_worker_is_forgotten():
    s = new_state(A)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"], restrictions={"x": [B]})
    assert s.stimulus_client_releases_keys("c", ["x"]) == NOTHING
    assert s.tasks == {} and s.unrunnable == set()


def test_no_worker_at_all_then_worker_joins():
    s = new_state()
    assert s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"]) == NOTHING
    assert s.tasks["x"].state == NO_WORKER
    assert s.stimulus_add_worker(A) == ({A: [compute_task("x", "f-x", 1, (0, 1, 0))]}, {})


def test_loose_restrictions_fall_back_to_any_worker_while_none_named_is_there():
    s = new_state(A)
    s.stimulus_update_graph("c", {"strict": "f", "loose": "f"}, {}, ["strict", "loose"],
                            restrictions={"strict": [B], "loose": [B]},
                            loose_restrictions=["loose"])
    assert states(s) == {"strict": NO_WORKER, "loose": PROCESSING}
    assert s.tasks["loose"].processing_on is s.workers[A]
    # once B is there, the preference holds
    s.stimulus_add_worker(B)
    assert s.tasks["strict"].processing_on is s.workers[B]
    s.stimulus_update_graph("c", {"loose2": "f"}, {}, ["loose2"], restrictions={"loose2": [B]},
                            loose_restrictions=["loose2"])
    assert s.tasks["loose2"].processing_on is s.workers[B]


# ---------------------------------------------------------------- restart, missing data
def test_restart_forgets_everything_and_tells_clients():
    s = new_state(A, B)
    s.stimulus_update_graph("c1", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_add_client("c2")
    assert s.stimulus_restart() == ({}, {"c1": [{"op": "restart"}], "c2": [{"op": "restart"}]})
    assert s.tasks == {}
    assert s.unrunnable == set()
    assert s.processing() == {A: [], B: []}
    assert s.has_what() == {A: [], B: []}
    assert [ws.nbytes for ws in s.workers.values()] == [0, 0]
    assert s.clients["c1"].wants_what == set()
    s.validate_state()
    # late reports of the old tasks are stale
    assert s.stimulus_task_finished("y", A, 2) == (
        {A: [{"op": "free-keys", "keys": ["y"], "run_id": 2}]}, {})
    # the same keys run again from scratch
    out = s.stimulus_update_graph("c1", {"x": "f-x", "y": "f-y"}, {"y": ["x"]}, ["y"])
    assert [m["key"] for msgs in out[0].values() for m in msgs] == ["x"]


def test_missing_data_reruns_the_lost_dependency():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"], restrictions={"x": [A]})
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_update_graph("c", {"y": "f-y"}, {"y": ["x"]}, ["y"], restrictions={"y": [B]})
    assert states(s) == {"x": MEMORY, "y": PROCESSING}
    out = s.stimulus_missing_data("y", B, 2, {"x": [A]})
    # x is gone: recompute it (the client wanted it) and run y again after
    assert out == ({B: [free_keys("y")], A: [compute_task("x", "f-x", 3, (0, 1, 0))]},
                   {"c": [{"op": "lost-data", "key": "x"}]})
    assert states(s) == {"x": PROCESSING, "y": WAITING}
    assert s.stimulus_task_finished("x", A, 3, nbytes=8, type="int") == (
        {B: [compute_task("y", "f-y", 4, (0, 2, 0), who_has={"x": [A]}, nbytes={"x": 8})]},
        {"c": [in_memory("x", A)]})


def test_missing_data_for_one_of_two_holders_keeps_the_other():
    s = new_state(A, B, C)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"], restrictions={"x": [A]})
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_add_keys(B, ["x"])
    assert s.who_has(["x"]) == {"x": [A, B]} or s.who_has(["x"]) == {"x": [B, A]}
    s.stimulus_update_graph("c", {"y": "f-y"}, {"y": ["x"]}, ["y"], restrictions={"y": [C]})
    out = s.stimulus_missing_data("y", C, 2, {"x": [A]})
    assert out == ({C: [free_keys("y"), compute_task("y", "f-y", 3, (0, 2, 0), who_has={"x": [B]},
                                                      nbytes={"x": 8})]}, {})
    assert s.who_has(["x"]) == {"x": [B]}


def test_add_keys_of_unknown_key_is_answered_with_free_keys():
    s = new_state(A)
    assert s.stimulus_add_keys(A, ["nope"]) == ({A: [free_keys("nope")]}, {})


# ---------------------------------------------------------------- FakeCluster
class FakeCluster:
    """One SchedulerState and several WorkerStates joined by a FIFO queue.

    Run specs are ``(func, [dependency keys])``; a worker "executes" one by
    calling ``func`` on the values of its dependencies from its own data.
    Every event (a message to a worker, to the scheduler, a thread finishing,
    a fetch finishing) is one entry of ``queue``, so tests can inspect, drop,
    duplicate or reorder them between :meth:`step` calls; :meth:`kill`
    removes a worker with everything it had queued.  Invariants of all state
    machines are checked after every step.
    """

    def __init__(self, *addresses, nthreads=1, **scheduler_kwargs):
        self.scheduler = CheckedSchedulerState(validate=True, **scheduler_kwargs)
        self.workers = {}
        self.data = {}
        self.client_messages = {}
        self.queue = deque()
        self.lost = set()  # (address, key) dropped behind the scheduler's back
        for addr in addresses:
            self.add_worker(addr, nthreads)

    def add_worker(self, addr, nthreads=1):
        self.workers[addr] = WState(addr, nthreads, validate=True)
        self.data[addr] = {}
        self._scheduler_out(self.scheduler.stimulus_add_worker(addr, nthreads))

    def submit(self, client, graph, keys, **kwargs):
        """``graph``: key -> ``(func, *dependency keys)``."""
        tasks = {k: (v[0], list(v[1:])) for k, v in graph.items()}
        deps = {k: list(v[1:]) for k, v in graph.items()}
        self._scheduler_out(self.scheduler.stimulus_update_graph(client, tasks, deps, keys,
                                                                 **kwargs))

    def release(self, client, keys):
        self._scheduler_out(self.scheduler.stimulus_client_releases_keys(client, keys))

    def kill(self, addr):
        """The worker dies: its queued events vanish and the scheduler hears of it."""
        del self.workers[addr]
        del self.data[addr]
        self.queue = deque(e for e in self.queue if e[1] != addr)
        self._scheduler_out(self.scheduler.stimulus_remove_worker(addr))

    def lose(self, addr, key):
        """The worker loses ``key`` silently (as if its memory were wiped);
        only a failed fetch will reveal it."""
        del self.data[addr][key]
        del self.workers[addr].tasks[key]
        self.lost.add((addr, key))

    # -- moving messages
    def _scheduler_out(self, out):
        to_workers, to_clients = out
        for addr, msgs in to_workers.items():
            for msg in msgs:
                self.queue.append(("to-worker", addr, dict(msg)))
        for client, msgs in to_clients.items():
            self.client_messages.setdefault(client, []).extend(msgs)

    def _worker_out(self, addr, instructions):
        for inst in instructions:
            if inst[0] == "execute":
                self.queue.append(("execute", addr, inst[1]))
            elif inst[0] == "gather":
                self.queue.append(("gather", addr, inst[1], inst[2]))
            elif inst[0] == "send":
                self.queue.append(("to-scheduler", addr, dict(inst[1])))
            elif inst[0] == "delete":
                for key in inst[1]:
                    self.data[addr].pop(key, None)
            else:
                raise AssertionError("unknown instruction %r" % (inst,))

    def step(self):
        event = self.queue.popleft()
        kind, addr = event[0], event[1]
        ws = self.workers.get(addr)
        if kind == "to-worker":
            msg = event[2]
            op = msg.pop("op")
            if op == "compute-task":
                self._worker_out(addr, ws.stimulus_compute_task(**msg))
            elif op == "free-keys":
                self._worker_out(addr, ws.stimulus_free_keys(**msg))
            elif op == "acquire-replicas":
                self._worker_out(addr, ws.stimulus_acquire_replicas(**msg))
            else:
                raise AssertionError("unexpected message to worker: %r" % (event,))
        elif kind == "execute":
            self._execute(addr, event[2])
        elif kind == "gather":
            peer, keys = event[2], event[3]
            peer_data = self.data.get(peer)
            got, missing = {}, []
            for key in keys:
                if peer_data is not None and key in peer_data:
                    self.data[addr][key] = peer_data[key]
                    got[key] = 8
                else:
                    missing.append(key)
            self._worker_out(addr, ws.stimulus_gather_done(
                peer, got, missing=missing, failed=peer_data is None))
        elif kind == "to-scheduler":
            msg = event[2]
            op = msg.pop("op")
            s = self.scheduler
            if op == "task-finished":
                out = s.stimulus_task_finished(worker=addr, **msg)
            elif op == "task-erred":
                out = s.stimulus_task_erred(worker=addr, **msg)
            elif op == "missing-data":
                out = s.stimulus_missing_data(worker=addr, **msg)
            elif op == "add-keys":
                out = s.stimulus_add_keys(worker=addr, **msg)
            else:
                raise AssertionError("unexpected message to scheduler: %r" % (event,))
            self._scheduler_out(out)
        self.validate()

    def _execute(self, addr, key):
        ws = self.workers[addr]
        wt = ws.tasks[key]
        func, deps = wt.run_spec
        try:
            value = func(*[self.data[addr][d] for d in deps])
        except Exception as e:
            out = ws.stimulus_execute_done(key, None, False, exception=e, traceback="tb")
        else:
            self.data[addr][key] = value
            out = ws.stimulus_execute_done(key, None, True, nbytes=8, type=type(value).__name__)
        self._worker_out(addr, out)

    def run(self, max_steps=10_000):
        """Step until nothing is queued."""
        for _ in range(max_steps):
            if not self.queue:
                return
            self.step()
        raise AssertionError("no quiescence after %d steps" % max_steps)

    def validate(self):
        self.scheduler.validate_state()
        for ws in self.workers.values():
            ws.validate_state()
        # every key the scheduler thinks is held is really there
        for ts in self.scheduler.tasks.values():
            for holder in ts.who_has:
                if (holder.address, ts.key) not in self.lost:
                    assert ts.key in self.data[holder.address], (ts, holder)

    def result(self, client, key):
        """The value of ``key`` as the client would fetch it."""
        (msg,) = [m for m in self.client_messages.get(client, [])
                  if m["key"] == key and m["op"] == "key-in-memory"][-1:]
        return self.data[msg["workers"][0]][key]


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def one():
    return 1


GRAPH = {"x": (one,), "y": (inc, "x"), "z": (add, "x", "y"), "w": (add, "y", "z")}


def test_fake_cluster_runs_graph_to_completion_then_frees_everything():
    fc = FakeCluster(A, B)
    fc.submit("c", GRAPH, ["w"], restrictions={"x": [A], "y": [B]})
    fc.run()
    assert fc.result("c", "w") == 5  # y=2, z=3, w=5
    assert [m["op"] for m in fc.client_messages["c"]] == ["key-in-memory"]
    assert states(fc.scheduler) == {"x": RELEASED, "y": RELEASED, "z": RELEASED, "w": MEMORY}
    # intermediate results and fetched copies are gone everywhere
    assert sum(len(d) for d in fc.data.values()) == 1
    fc.release("c", ["w"])
    fc.run()
    assert fc.scheduler.tasks == {}
    assert fc.data == {A: {}, B: {}}
    assert all(ws.tasks == {} for ws in fc.workers.values())


def test_fake_cluster_error_reaches_client_with_original_exception():
    def bad(x):
        raise ZeroDivisionError("nope")

    fc = FakeCluster(A, B)
    fc.submit("c", {"x": (one,), "y": (bad, "x"), "z": (inc, "y")}, ["z"])
    fc.run()
    (msg,) = fc.client_messages["c"]
    assert msg["op"] == "task-erred" and msg["key"] == "z"
    assert type(msg["exception"]) is ZeroDivisionError
    assert str(msg["exception"]) == "nope"
    fc.release("c", ["z"])
    fc.run()
    assert fc.scheduler.tasks == {}
    assert fc.data == {A: {}, B: {}}


def test_fake_cluster_recovers_when_a_worker_dies_mid_graph():
    fc = FakeCluster(A, B)
    fc.submit("c", GRAPH, ["w", "x"], restrictions={"x": [A, B], "y": [B]})
    # run until x is in memory somewhere, then kill that worker
    while fc.scheduler.tasks["x"].state != MEMORY:
        fc.step()
    (holder,) = [ws.address for ws in fc.scheduler.tasks["x"].who_has]
    fc.kill(holder)
    fc.add_worker(C)
    fc.run()
    assert fc.result("c", "w") == 5
    assert fc.result("c", "x") == 1
    assert {"op": "lost-data", "key": "x"} in fc.client_messages["c"]


def test_replication_off_by_default_sends_no_copies():
    s = new_state(A, B)
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    assert s.stimulus_task_finished("x", A, 1, nbytes=8, type="int") == (
        {}, {"c": [in_memory("x", A)]})


def test_replication_asks_the_least_busy_other_worker_for_a_copy_of_small_results():
    s = new_state(A, B, C)
    s.replicate_nbytes = 100
    s.stimulus_update_graph("c", {"x": "f-x", "big": "f-big"}, {}, ["x", "big"],
                            restrictions={"x": [A], "big": [A]})
    s.stimulus_update_graph("c", {"busy": "f-busy"}, {}, ["busy"], restrictions={"busy": [B]})
    assert s.stimulus_task_finished("x", A, s.tasks["x"].run_id, nbytes=8, type="int") == (
        {C: [{"op": "acquire-replicas", "who_has": {"x": [A]}, "nbytes": {"x": 8}}]},
        {"c": [in_memory("x", A)]})
    # the copy counts once the worker says it has it
    assert s.who_has(["x"]) == {"x": [A]}
    assert s.stimulus_add_keys(C, ["x"]) == NOTHING
    assert sorted(s.who_has(["x"])["x"]) == [A, C]
    # too big for a copy
    assert s.stimulus_task_finished("big", A, s.tasks["big"].run_id, nbytes=1000,
                                    type="bytes") == (
        {}, {"c": [in_memory("big", A, nbytes=1000, type="bytes")]})


def test_removed_worker_leaves_single_copies_which_are_copied_again():
    s = new_state(A, B, C)
    s.replicate_nbytes = 100
    s.stimulus_update_graph("c", {"x": "f-x", "y": "f-y", "big": "f-big"}, {},
                            ["x", "y", "big"], restrictions={"x": [A], "y": [B], "big": [B]})
    s.stimulus_task_finished("x", A, s.tasks["x"].run_id, nbytes=8, type="int")
    s.stimulus_add_keys(B, ["x"])
    s.stimulus_task_finished("y", B, s.tasks["y"].run_id, nbytes=8, type="int")
    s.stimulus_add_keys(C, ["y"])
    s.stimulus_task_finished("big", B, s.tasks["big"].run_id, nbytes=1000, type="bytes")
    assert {k: sorted(v) for k, v in s.who_has(["x", "y"]).items()} == {"x": [A, B], "y": [B, C]}
    # B dies: x and y are left with one copy each and get a second one, in
    # one message per worker; big (too large to copy) is lost, and waits for
    # a worker it may run on
    to_workers, to_clients = s.stimulus_remove_worker(B)
    assert to_workers[C] == [{"op": "acquire-replicas", "who_has": {"x": [A]}, "nbytes": {"x": 8}}]
    assert [m for m in to_workers[A] if m["op"] == "acquire-replicas"] == [
        {"op": "acquire-replicas", "who_has": {"y": [C]}, "nbytes": {"y": 8}}]
    assert not [m for m in to_workers[A] + to_workers[C] if m["op"] == "compute-task"]
    assert s.tasks["big"].state == "no-worker"
    assert to_clients == {"c": [{"op": "lost-data", "key": "big"}]}


def test_copy_reported_after_its_key_was_released_is_freed():
    s = new_state(A, B)
    s.replicate_nbytes = 100
    s.stimulus_update_graph("c", {"x": "f-x"}, {}, ["x"])
    s.stimulus_task_finished("x", A, 1, nbytes=8, type="int")
    s.stimulus_client_releases_keys("c", ["x"])
    assert s.stimulus_add_keys(B, ["x"]) == ({B: [free_keys("x")]}, {})


def test_fake_cluster_with_replication_loses_no_result_when_a_holder_dies():
    calls = []

    def counted_one():
        calls.append(1)
        return 1

    fc = FakeCluster(A, B, C)
    fc.scheduler.replicate_nbytes = 1000
    leaves = {"x%d" % i: (counted_one,) for i in range(6)}
    graph = dict(leaves, total=(lambda *xs: sum(xs), *leaves))
    fc.submit("c", graph, ["total"], restrictions={"total": [C]})
    # run until every leaf is in memory on two workers, before total runs
    for _ in range(10_000):
        tss = [fc.scheduler.tasks[k] for k in leaves]
        if all(len(ts.who_has) == 2 for ts in tss):
            break
        fc.step()
    assert all(len(fc.scheduler.tasks[k].who_has) == 2 for k in leaves)
    assert len(calls) == 6
    assert any(fc.scheduler.workers[A] in fc.scheduler.tasks[k].who_has for k in leaves)
    fc.kill(A)
    fc.run()
    assert fc.result("c", "total") == 6
    assert len(calls) == 6  # nothing ran again: the copies stood in for A's results
    fc.release("c", ["total"])
    fc.run()
    assert fc.scheduler.tasks == {}
    assert all(d == {} for d in fc.data.values())
    assert all(ws.tasks == {} for ws in fc.workers.values())


def test_fake_cluster_reruns_dependency_lost_before_it_was_fetched():
    fc = FakeCluster(A, B)
    fc.submit("c", {"x": (one,), "y": (inc, "x")}, ["y"],
              restrictions={"x": [A], "y": [B]})
    while fc.scheduler.tasks["x"].state != MEMORY:
        fc.step()
    # A loses x without telling anyone; B's fetch will miss it
    fc.lose(A, "x")
    fc.run()
    assert fc.result("c", "y") == 2
    assert fc.scheduler.tasks["y"].state == MEMORY


def test_fake_cluster_stale_result_after_release_and_resubmit():
    fc = FakeCluster(A)
    fc.submit("c", {"x": (one,)}, ["x"])
    fc.step()  # compute-task reaches A; it starts executing
    assert fc.queue[0][0] == "execute"
    fc.release("c", ["x"])
    fc.submit("c", {"x": (one,)}, ["x"])
    fc.run()
    assert fc.result("c", "x") == 1
    assert [m["op"] for m in fc.client_messages["c"]] == ["key-in-memory"]
    assert fc.scheduler.tasks["x"].state == MEMORY
    assert fc.data == {A: {"x": 1}}


def test_fake_cluster_shared_key_between_two_clients():
    fc = FakeCluster(A, B)
    fc.submit("c1", {"x": (one,), "y": (inc, "x")}, ["y"])
    fc.submit("c2", {"x": (one,), "y": (inc, "x")}, ["y"])
    fc.run()
    assert fc.result("c1", "y") == fc.result("c2", "y") == 2
    fc.release("c1", ["y"])
    fc.run()
    assert fc.scheduler.tasks["y"].state == MEMORY
    fc.release("c2", ["y"])
    fc.run()
    assert fc.scheduler.tasks == {}
    assert fc.data == {A: {}, B: {}}
