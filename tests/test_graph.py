"""Graph preparation and the executor's held-graph index (pure, no sockets)."""
import doctest

from distributed import graph
from distributed.graph import HeldGraph


def test_graph_module_doctests():
    failures, tried = doctest.testmod(graph)
    assert tried >= 2 and failures == 0


def test_released_chain_drops_only_what_nothing_else_keeps():
    g = HeldGraph()
    g.add("a", "A", ())
    g.add("b", "B", ("a",))
    g.add("c", "C", ("b",))
    g.add("d", "D", ("a",))
    # Futures are held for c and d only
    g.release("c", {"d"})
    assert sorted(g.tasks) == ["a", "d"]   # b went with c; a is still d's
    g.release("d", set())
    assert g.tasks == {}


def test_held_dependency_outlives_its_dependents():
    g = HeldGraph()
    g.add("x", "X", ())
    g.add("y", "Y", ("x",))
    g.release("y", {"x"})        # the Future for x is still alive
    assert list(g.tasks) == ["x"]
    g.release("x", set())
    assert len(g) == 0


def test_adding_a_known_key_again_changes_nothing():
    g = HeldGraph()
    g.add("x", "X", ())
    g.add("y", "Y", ("x",))
    g.add("y", "Y2", ("x",))
    assert g.tasks["y"] == "Y"
    g.release("y", set())
    assert g.tasks == {}


def test_shared_dependency_stays_until_the_last_dependent_goes():
    g = HeldGraph()
    g.add("x", "X", ())
    for k in ("p", "q"):
        g.add(k, k.upper(), ("x",))
    g.release("p", {"q"})
    assert sorted(g.tasks) == ["q", "x"]
    g.release("q", set())
    assert g.tasks == {}
