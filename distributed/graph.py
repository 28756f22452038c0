"""Dask graphs to tasks the scheduler can run (pure functions, no I/O).

dask hands ``get`` an expression, a HighLevelGraph or a plain dict whose
values are legacy tuples ``(func, *args)``, literals, or ``dask._task_spec``
nodes.  :func:`prepare_graph` turns any of them into ``{key: GraphNode}``,
culled to what the requested keys need, with each node's dependencies and a
priority from ``dask.order`` (lower runs first).  Workers run a node as
``node(values)``, where ``values`` maps each dependency key to its data.
"""
from __future__ import annotations

from collections.abc import Mapping

from dask._task_spec import Alias, DataNode, GraphNode, convert_legacy_graph
from dask.core import flatten


def materialize(dsk):
    """Expression, HighLevelGraph or dict to ``(dict, annotations)``."""
    annotations = {}
    if not isinstance(dsk, Mapping):
        if hasattr(dsk, "__dask_graph__"):
            graph = dsk.__dask_graph__()
            try:
                annotations = dsk.__dask_annotations__() or {}
            except (AttributeError, TypeError):
                annotations = {}
            dsk = graph
        else:
            raise TypeError("Expected a dask graph (dict, HighLevelGraph or expression), got %s"
                            % type(dsk).__name__)
    if not isinstance(dsk, dict):
        from dask.utils import ensure_dict

        dsk = ensure_dict(dsk)
    return dsk, annotations


def prepare_graph(dsk, keys, known_keys=()):
    """The part of ``dsk`` that ``keys`` need, as GraphNodes.

    Returns ``(nodes, dependencies, priorities)``.  Keys in ``known_keys``
    (data the cluster already holds) are not in ``nodes`` but may appear as
    dependencies.  Raises ValueError for a dependency that is neither in the
    graph nor known.

    >>> from operator import add
    >>> nodes, deps, prio = prepare_graph({'x': 1, 'y': (add, 'x', 10), 'z': (add, 1, 1)}, ['y'])
    >>> sorted(nodes), sorted(deps['y'])
    (['x', 'y'], ['x'])
    >>> nodes['y']({'x': 1})
    11
    """
    dsk, _ = materialize(dsk)
    known = set(known_keys)
    all_keys = set(dsk) | known
    converted = convert_legacy_graph(dsk, all_keys=all_keys)
    for key in list(dsk):
        if key not in converted:
            # ``{'x': 'x'}``-style self references vanish in conversion
            converted[key] = DataNode(key, dsk[key])
    nodes, dependencies = {}, {}
    stack = list(flatten(keys)) if isinstance(keys, list) else [keys]
    while stack:
        key = stack.pop()
        if key in nodes:
            continue
        node = converted.get(key)
        if node is None:
            if key in known:
                continue
            raise ValueError("Missing dependency %r: it is neither in the graph nor held by "
                             "the cluster" % (key,))
        nodes[key] = node
        deps = node.dependencies
        dependencies[key] = deps
        stack.extend(d for d in deps if d not in nodes)
    return nodes, dependencies, order_nodes(nodes, dependencies)


def order_nodes(nodes, dependencies):
    """Priorities from ``dask.order`` (lower first), falling back to
    submission order if ordering fails on an unusual graph."""
    if len(nodes) <= 1:
        return {k: 0 for k in nodes}
    try:
        from dask.order import order

        sub = {k: v for k, v in nodes.items()}
        return order(sub)
    except Exception:  # ordering is an optimisation; never fail a computation on it
        return {k: i for i, k in enumerate(nodes)}


def is_alias_of(node: GraphNode):
    return node.target if isinstance(node, Alias) else None


class HeldGraph:
    """What computes each key that some Future of one executor still needs.

    An entry stays while its key is held (a live Future for it) or while
    another entry depends on it; releasing the last holder of a key drops
    its entry and, in turn, every dependency that nothing else keeps.  So
    ``executor.dask`` shows the graph of the computations still held, and a
    finished ``compute`` of 100,000 tasks leaves nothing behind.

    >>> g = HeldGraph()
    >>> g.add('x', 'load', ()); g.add('y', 'clean(x)', ('x',))
    >>> held = {'y'}                # the Future for 'x' is gone already
    >>> g.release('x', held)        # 'y' still needs it
    >>> sorted(g.tasks)
    ['x', 'y']
    >>> g.release('y', set())
    >>> g.tasks
    {}
    """

    __slots__ = ("tasks", "_deps", "_ndependents")

    def __init__(self):
        self.tasks = {}
        self._deps = {}
        self._ndependents = {}

    def __len__(self):
        return len(self.tasks)

    def add(self, key, task, deps):
        if key in self.tasks:
            return
        self.tasks[key] = task
        if deps:
            self._deps[key] = deps
            nd = self._ndependents
            for d in deps:
                nd[d] = nd.get(d, 0) + 1

    def release(self, key, held):
        """``key`` lost its last holder; ``held``: the keys still held."""
        stack = [key]
        nd = self._ndependents
        while stack:
            k = stack.pop()
            if k not in self.tasks or nd.get(k, 0) > 0:
                continue
            del self.tasks[k]
            nd.pop(k, None)
            for d in self._deps.pop(k, ()):
                n = nd.get(d, 0) - 1
                if n > 0:
                    nd[d] = n
                else:
                    nd.pop(d, None)
                    if d not in held:
                        stack.append(d)

    def clear(self):
        self.tasks.clear()
        self._deps.clear()
        self._ndependents.clear()
