"""The neighbour graph is k-regular, symmetric, seeded by its key, and complete at k = n - 1."""

import pytest

from fedtune.secagg.graph import default_neighbours, effective_neighbours, neighbour_graph, shuffled


@pytest.mark.parametrize(("n", "k"), [(10, 4), (10, 3), (11, 4), (11, 3), (50, 12), (7, 6), (7, 20)])
def test_graph_is_regular_and_symmetric(n, k):
    graph = neighbour_graph(range(n), k, bytes(32))
    degree = effective_neighbours(k, n)
    assert set(graph) == set(range(n))
    for u, vs in graph.items():
        assert u not in vs and len(vs) == degree
        assert all(u in graph[v] for v in vs)


def test_degree_adjustments_and_defaults():
    assert effective_neighbours(3, 11) == 4  # no 3-regular graph on 11 vertices
    assert effective_neighbours(3, 10) == 3
    assert effective_neighbours(12, 5) == 4  # all pairs
    assert [default_neighbours(n) for n in (1, 2, 3, 10, 50, 100, 1000)] == [0, 1, 2, 8, 12, 14, 20]


def test_graph_depends_on_its_seed_only():
    a = neighbour_graph(range(30), 6, bytes(32))
    assert a == neighbour_graph(reversed(range(30)), 6, bytes(32))
    assert a != neighbour_graph(range(30), 6, bytes([1] * 32))
    assert sorted(shuffled(range(30), bytes(32))) == list(range(30))
    assert neighbour_graph([4, 9], 1) == {4: frozenset({9}), 9: frozenset({4})}


def test_config_settings_resolve_to_the_degree_the_graph_has():
    from fedtune.secagg.graph import resolve_neighbours

    assert resolve_neighbours("all", 8) == 7
    assert resolve_neighbours("auto", 50) == 12  # 2 * ceil(log2 50)
    assert resolve_neighbours(3, 9) == 4  # odd k with odd n: the Harary graph needs k + 1
    assert resolve_neighbours(20, 6) == 5  # capped at n - 1
