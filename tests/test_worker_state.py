"""State-layer tests of distributed.worker_state: stimuli in, exact
instructions out, invariants validated after every step.  No loop, no threads."""
from distributed.worker_state import (
    CANCELLED,
    EXECUTING,
    FETCH,
    FLIGHT,
    MEMORY,
    READY,
    WAITING,
    WorkerState,
)

ME, A, B = "tcp://10.0.0.9:9000", "tcp://10.0.0.1:8000", "tcp://10.0.0.2:8000"
PRIO = (0, 1, 0)


def new(nthreads=1):
    return WorkerState(ME, nthreads=nthreads, validate=True)


def slots(w):
    """How many tasks may be handed to the thread pool at once: its threads,
    plus queued ``prefetch`` tasks where the worker state has that notion."""
    return w.nthreads + getattr(w, "prefetch", 0)


def finished(key, run_id, nbytes=8, type="int"):
    return ("send", {"op": "task-finished", "key": key, "run_id": run_id,
                     "nbytes": nbytes, "type": type})


def gathers(out):
    """``{peer: sorted keys}`` of the gather instructions in ``out``
    (a peer must appear at most once)."""
    result = {}
    for inst in out:
        if inst[0] == "gather":
            assert inst[1] not in result, "two gathers to %s in one go" % inst[1]
            result[inst[1]] = sorted(inst[2])
    return result


def deleted(out):
    return sorted(k for inst in out if inst[0] == "delete" for k in inst[1])


def sends(out):
    return [inst[1] for inst in out if inst[0] == "send"]


def states(w):
    return {key: wt.state for key, wt in w.tasks.items()}


def run_local(w, key, run_id, nbytes=8):
    """Compute-task without dependencies and let it finish."""
    assert w.stimulus_compute_task(key, "f-" + key, PRIO, run_id) == [("execute", key)]
    assert w.stimulus_execute_done(key, None, True, nbytes=nbytes, type="int") == [
        finished(key, run_id, nbytes)]


def test_task_without_dependencies_executes_at_once():
    w = new()
    assert w.stimulus_compute_task("x", "f-x", PRIO, 1) == [("execute", "x")]
    assert states(w) == {"x": EXECUTING}
    assert w.executing == {"x"}


def test_task_with_all_dependencies_local_executes_at_once():
    w = new()
    run_local(w, "x", 1)
    out = w.stimulus_compute_task("y", "f-y", PRIO, 2, who_has={"x": [ME]}, nbytes={"x": 8})
    assert out == [("execute", "y")]
    assert w.tasks["y"].dependencies == {"x"}
    assert w.tasks["x"].dependents == {"y"}


def test_missing_dependencies_are_gathered_with_one_request_per_peer():
    w = new()
    out = w.stimulus_compute_task(
        "z", "f-z", PRIO, 1, who_has={"x": [A], "y": [A], "v": [B]},
        nbytes={"x": 8, "y": 8, "v": 8})
    assert len(out) == 2
    assert gathers(out) == {A: ["x", "y"], B: ["v"]}
    assert states(w) == {"z": WAITING, "x": FLIGHT, "y": FLIGHT, "v": FLIGHT}
    assert w.in_flight == {A: {"x", "y"}, B: {"v"}}


def test_gather_done_then_execute_when_last_dependency_arrives():
    w = new()
    w.stimulus_compute_task("z", "f-z", PRIO, 1, who_has={"x": [A], "v": [B]})
    assert w.stimulus_gather_done(A, {"x": 8}) == []
    assert states(w) == {"z": WAITING, "x": MEMORY, "v": FLIGHT}
    assert w.tasks["z"].waiting_for == {"v"}
    assert w.stimulus_gather_done(B, {"v": 8}) == [("execute", "z")]
    assert w.in_flight == {}


def test_execute_done_sends_task_finished_and_drops_fetched_copies():
    w = new()
    w.stimulus_compute_task("z", "f-z", PRIO, 7, who_has={"x": [A], "v": [B]})
    w.stimulus_gather_done(A, {"x": 8})
    w.stimulus_gather_done(B, {"v": 8})
    out = w.stimulus_execute_done("z", None, True, nbytes=16, type="list")
    assert sends(out) == [{"op": "task-finished", "key": "z", "run_id": 7, "nbytes": 16,
                           "type": "list"}]
    assert deleted(out) == ["v", "x"]
    assert len(out) == 3
    # only the owned result is kept
    assert states(w) == {"z": MEMORY}


def test_fetched_copy_is_kept_until_its_last_local_dependent_ran():
    w = new()
    w.stimulus_compute_task("y1", "f", (0, 1, 0), 1, who_has={"x": [A]})
    # a second task for the same dependency does not fetch it again
    assert w.stimulus_compute_task("y2", "f", (0, 1, 1), 2, who_has={"x": [A]}) == []
    out = w.stimulus_gather_done(A, {"x": 8})
    assert out == [("execute", "y1"), ("execute", "y2")][:slots(w)]
    out = w.stimulus_execute_done("y1", None, True, nbytes=8, type="int")
    assert finished("y1", 1) in out and deleted(out) == []
    assert "x" in w.tasks
    if slots(w) == 1:
        assert out == [finished("y1", 1), ("execute", "y2")]
    out = w.stimulus_execute_done("y2", None, True, nbytes=8, type="int")
    assert sorted(out, key=repr) == [("delete", ["x"]), finished("y2", 2)]
    assert states(w) == {"y1": MEMORY, "y2": MEMORY}


def test_owned_result_used_locally_is_not_deleted():
    w = new()
    run_local(w, "x", 1)
    w.stimulus_compute_task("y", "f-y", PRIO, 2, who_has={"x": [ME]})
    out = w.stimulus_execute_done("y", None, True, nbytes=8, type="int")
    assert out == [finished("y", 2)]
    assert states(w) == {"x": MEMORY, "y": MEMORY}


def test_task_erred_is_reported_with_the_exception_unchanged():
    w = new()
    w.stimulus_compute_task("x", "f-x", PRIO, 3)
    exc = object()
    out = w.stimulus_execute_done("x", None, False, exception=exc, traceback="tb")
    assert out == [("send", {"op": "task-erred", "key": "x", "run_id": 3,
                             "exception": exc, "traceback": "tb"})]
    assert out[0][1]["exception"] is exc
    assert w.tasks == {}


def fill(w):
    """Occupy every execution slot with filler tasks; returns their keys."""
    keys = ["filler-%d" % i for i in range(slots(w))]
    for i, key in enumerate(keys):
        assert w.stimulus_compute_task(key, "f", (0, 0, 0), 100 + i) == [("execute", key)]
    assert w.stimulus_compute_task("one-too-many", "f", (0, 0, 0), 99) == []
    assert w.stimulus_free_keys(["one-too-many"]) == []
    return keys


def test_nthreads_limit_and_priority_order():
    w = new(nthreads=2)
    fillers = fill(w)
    assert len(w.executing) == slots(w) >= 2
    # every slot busy: these queue, whatever their priority
    tasks = [("c", (0, 1, 2), 3), ("b", (0, 1, 1), 4), ("d", (0, 1, 0), 5), ("a", (0, 1, 3), 6),
             ("early", (0, 0, 9), 7), ("urgent", (-1, 5, 0), 8)]
    for key, prio, run_id in tasks:
        assert w.stimulus_compute_task(key, "f", prio, run_id) == []
        assert len(w.executing) == slots(w)
    assert {k for k, s in states(w).items() if s == READY} == {t[0] for t in tasks}
    run_ids = {t[0]: t[2] for t in tasks}
    run_ids.update({key: 100 + i for i, key in enumerate(fillers)})
    order = []
    running = list(fillers)
    while running:
        key = running.pop(0)
        out = w.stimulus_execute_done(key, None, True, nbytes=8, type="int")
        assert out[0] == finished(key, run_ids[key])
        started = [inst[1] for inst in out if inst[0] == "execute"]
        assert len(started) <= 1
        order.extend(started)
        running.extend(started)
        assert len(w.executing) <= slots(w)
    assert order == ["urgent", "early", "d", "b", "c", "a"]


def test_free_keys_of_queued_task_drops_it():
    w = new(nthreads=1)
    fillers = fill(w)
    w.stimulus_compute_task("t2", "f", PRIO, 2)
    assert states(w)["t2"] == READY
    assert w.stimulus_free_keys(["t2"]) == []
    assert "t2" not in w.tasks
    assert w.stimulus_execute_done(fillers[0], None, True, nbytes=8, type="int") == [
        finished(fillers[0], 100)]


def test_free_keys_while_executing_cancels_and_drops_the_result_silently():
    w = new()
    w.stimulus_compute_task("x", "f-x", PRIO, 1)
    assert w.stimulus_free_keys(["x"]) == [("abandon", "x")]
    assert states(w) == {"x": CANCELLED}
    assert w.executing == set()
    # the thread finishes: the result is dropped and nobody is told
    assert w.stimulus_execute_done("x", None, True, nbytes=8, type="int") == [("delete", ["x"])]
    assert w.tasks == {}
    assert w.executing == set()


def test_cancelling_a_running_task_gives_its_thread_slot_to_the_next_task():
    w = new(nthreads=1)
    w.prefetch = 0
    assert w.stimulus_compute_task("long", "f-long", PRIO, 1) == [("execute", "long")]
    assert w.stimulus_compute_task("quick", "f-quick", PRIO, 2) == []  # no free thread
    assert w.stimulus_free_keys(["long"]) == [("abandon", "long"), ("execute", "quick")]
    assert states(w) == {"long": CANCELLED, "quick": EXECUTING}
    assert w.executing == {"quick"}
    assert w.stimulus_execute_done("quick", None, True, nbytes=8, type="int") == [
        finished("quick", 2)]
    # the abandoned run ends later: dropped silently
    assert w.stimulus_execute_done("long", None, True, nbytes=8, type="int") == [
        ("delete", ["long"])]
    assert states(w) == {"quick": MEMORY}


def test_cancelled_task_that_fails_sends_nothing():
    w = new()
    w.stimulus_compute_task("x", "f-x", PRIO, 1)
    w.stimulus_free_keys(["x"])
    assert w.stimulus_execute_done("x", None, False, exception="E", traceback="T") == []
    assert w.tasks == {}


def test_cancelled_task_reassigned_reports_the_new_run_id():
    w = new()
    w.stimulus_compute_task("x", "f-x", PRIO, 1)
    w.stimulus_free_keys(["x"])
    assert w.stimulus_compute_task("x", "f-x", PRIO, 2) == [("resume", "x")]
    assert w.executing == {"x"}
    assert states(w) == {"x": EXECUTING}
    assert w.stimulus_execute_done("x", None, True, nbytes=8, type="int") == [finished("x", 2)]


def test_free_keys_with_other_run_id_is_ignored():
    w = new()
    run_local(w, "x", 2)
    assert w.stimulus_free_keys(["x"], run_id=1) == []
    assert states(w) == {"x": MEMORY}
    assert w.stimulus_free_keys(["x"], run_id=2) == [("delete", ["x"])]
    assert w.tasks == {}


def test_free_keys_of_result_in_memory_deletes_it():
    w = new()
    run_local(w, "x", 1)
    assert w.stimulus_free_keys(["x", "unknown"]) == [("delete", ["x"])]
    assert w.tasks == {}


def test_compute_task_for_result_already_here_reports_at_once():
    w = new()
    run_local(w, "x", 1)
    assert w.stimulus_compute_task("x", "f-x", PRIO, 5) == [
        ("send", {"op": "task-finished", "key": "x", "run_id": 5, "nbytes": 8, "type": None})]


def test_missing_dependency_tries_every_peer_then_sends_missing_data():
    w = new()
    out = w.stimulus_compute_task("y", "f-y", PRIO, 4, who_has={"x": [A, B]})
    ((peer1, keys),) = gathers(out).items()
    assert keys == ["x"]
    peer2 = B if peer1 == A else A
    assert w.stimulus_gather_done(peer1, {}, missing=["x"]) == [("gather", peer2, ["x"])]
    assert w.stimulus_gather_done(peer2, {}, failed=True) == [
        ("send", {"op": "missing-data", "key": "y", "run_id": 4,
                  "missing": {"x": [peer1, peer2]}})]
    assert w.tasks == {}
    assert w.in_flight == {}


def test_dependency_with_no_peer_but_ourselves_is_missing_at_once():
    w = new()
    assert w.stimulus_compute_task("y", "f-y", PRIO, 4, who_has={"x": [ME]}) == [
        ("send", {"op": "missing-data", "key": "y", "run_id": 4, "missing": {"x": [ME]}})]
    assert w.tasks == {}


def test_removed_peer_is_not_fetched_from_and_its_fetch_retries_elsewhere():
    w2 = new()
    w2.stimulus_compute_task("y1", "f", PRIO, 1, who_has={"x1": [A]})
    w2.in_flight[B] = {"busy"}  # B busy too: x2 must wait in fetch
    w2.max_fetches = 2
    assert w2.stimulus_compute_task("y2", "f", PRIO, 2, who_has={"x2": [A]}) == []
    # the scheduler says A is gone: x2 has nobody left, y2 goes back
    assert w2.stimulus_peer_removed(A) == [
        ("send", {"op": "missing-data", "key": "y2", "run_id": 2, "missing": {"x2": [A]}})]
    # the cut fetch of x1 from A ends as failed: y1 goes back too
    assert w2.stimulus_gather_done(A, {}, failed=True) == [
        ("send", {"op": "missing-data", "key": "y1", "run_id": 1, "missing": {"x1": [A]}})]
    assert "y1" not in w2.tasks and "y2" not in w2.tasks


def test_removed_peer_with_another_holder_fetches_from_that_one():
    w = new()
    w.stimulus_compute_task("y1", "f", PRIO, 1, who_has={"x1": [A]})
    w.stimulus_compute_task("y2", "f", PRIO, 2, who_has={"x2": [A]})
    assert states(w)["x2"] == FETCH
    w.tasks["x2"].who_has = [A, B]
    assert w.stimulus_peer_removed(A) == [("gather", B, ["x2"])]


def test_acquired_replica_is_fetched_kept_and_reported():
    w = new()
    assert w.stimulus_acquire_replicas({"x": [A]}, nbytes={"x": 8}) == [("gather", A, ["x"])]
    assert w.stimulus_gather_done(A, {"x": 8}) == [("send", {"op": "add-keys", "keys": ["x"]})]
    assert states(w) == {"x": MEMORY}
    # kept until the scheduler frees it
    assert w.stimulus_free_keys(["x"]) == [("delete", ["x"])]
    assert w.tasks == {}


def test_replica_of_a_copy_already_here_is_reported_at_once():
    w = new()
    w.stimulus_compute_task("y", "f-y", PRIO, 1, who_has={"x": [A]})
    w.stimulus_gather_done(A, {"x": 8})
    assert w.stimulus_acquire_replicas({"x": [A]}) == [
        ("send", {"op": "add-keys", "keys": ["x"]})]
    w.stimulus_execute_done("y", None, True, nbytes=8, type="int")
    assert states(w) == {"x": MEMORY, "y": MEMORY}  # y ran, but x is owned now


def test_replica_nobody_can_give_is_dropped_without_a_report():
    w = new()
    w.stimulus_acquire_replicas({"x": [A]})
    assert w.stimulus_gather_done(A, {}, failed=True) == []
    assert w.tasks == {}
    assert w.stimulus_acquire_replicas({"x": [ME]}) == []  # only from ourselves: nothing
    assert w.tasks == {}


def test_data_arriving_for_a_freed_task_is_deleted():
    w = new()
    w.stimulus_compute_task("y", "f-y", PRIO, 1, who_has={"x": [A]})
    assert w.stimulus_free_keys(["y"]) == []
    assert states(w) == {"x": FLIGHT}
    assert w.stimulus_gather_done(A, {"x": 8}) == [("delete", ["x"])]
    assert w.tasks == {}


def test_one_request_per_peer_at_a_time_and_the_rest_follows():
    w = new()
    w.stimulus_compute_task("y1", "f", PRIO, 1, who_has={"x1": [A]})
    # A is busy with x1: x2 waits for that request to end
    assert w.stimulus_compute_task("y2", "f", PRIO, 2, who_has={"x2": [A]}) == []
    assert states(w)["x2"] == FETCH
    assert w.stimulus_gather_done(A, {"x1": 8}) == [("execute", "y1"), ("gather", A, ["x2"])]


def test_max_fetches_limits_peers_in_flight():
    w = WorkerState(ME, nthreads=1, max_fetches=2, validate=True)
    peers = ["tcp://10.0.1.%d:1" % i for i in range(4)]
    out = w.stimulus_compute_task("y", "f", PRIO, 1,
                                  who_has={"x%d" % i: [p] for i, p in enumerate(peers)})
    assert len(gathers(out)) == 2
    assert len(w.in_flight) == 2
    (first,) = [p for p in peers if p in w.in_flight][:1]
    out = w.stimulus_gather_done(first, {k: 8 for k in w.in_flight[first]})
    assert len(gathers(out)) == 1
    assert len(w.in_flight) == 2


def test_paused_worker_starts_nothing_until_resumed():
    w = new()
    assert w.stimulus_pause(True) == []
    assert w.stimulus_compute_task("x", "f-x", PRIO, 1) == []
    assert states(w) == {"x": READY}
    assert w.stimulus_pause(False) == [("execute", "x")]


def test_clear_forgets_everything_but_running_threads():
    w = new()
    run_local(w, "x", 1)
    w.stimulus_compute_task("y", "f-y", PRIO, 2)
    out = w.stimulus_clear()
    assert out == [("delete", ["x"]), ("abandon", "y")]
    assert states(w) == {"y": CANCELLED}
    assert w.stimulus_execute_done("y", None, True, nbytes=8, type="int") == [("delete", ["y"])]
    assert w.tasks == {}
