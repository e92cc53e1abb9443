"""Who talks to whom in a decentralized federation: undirected, connected graphs as neighbour lists.

A `Graph` holds each client's neighbours (population indices, sorted); it is symmetric and has no
self-loops or repeated edges. `ring` is fixed; `random_regular` and `erdos_renyi` draw from a numpy
`Generator` the caller passes (the run's is `fedtune.seeding.numpy_rng(run.seed, "decentral-graph")`),
never from a global stream, so a run's graph repeats with its seed.

A disconnected graph splits the federation into federations that never hear of each other, so
`communication_graph` only returns connected ones: a random graph is redrawn from the same generator until
it is, and after `attempts` disconnected draws the config is refused (`ConfigError`: raise the degree or
the edge probability). A random k-regular graph is drawn as networkx's `random_regular_graph` does
(Steger and Wormald 1999: pair up the k stubs of every node at random, keep the pairs that make a new edge,
re-pair the rest, start over when no pair is left that could), for k above (n - 1) / 2 as the complement of
an (n - 1 - k)-regular one, which is where that method is slow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedtune.errors import ConfigError

GraphKind = Literal["ring", "k_regular", "erdos_renyi"]
ATTEMPTS = 100  # disconnected draws of a random graph before the config is refused


@dataclass(frozen=True)
class Graph:
    """`neighbours[i]`: the nodes node i exchanges adapters with, sorted."""

    neighbours: tuple[tuple[int, ...], ...]

    @classmethod
    def from_edges(cls, num_nodes: int, edges: Iterable[tuple[int, int]]) -> Graph:
        adjacent: list[set[int]] = [set() for _ in range(num_nodes)]
        for a, b in edges:
            if a == b:
                raise ValueError(f"a self-loop at node {a}")
            adjacent[a].add(b)
            adjacent[b].add(a)
        return cls(tuple(tuple(sorted(n)) for n in adjacent))

    @property
    def num_nodes(self) -> int:
        return len(self.neighbours)

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(len(n) for n in self.neighbours)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Each edge once, as (smaller, larger), sorted."""
        return [(i, j) for i, ns in enumerate(self.neighbours) for j in ns if i < j]

    def connected(self) -> bool:
        """Every node reaches every other (breadth-first from node 0)."""
        if self.num_nodes == 0:
            return True
        seen, queue = {0}, deque([0])
        while queue:
            for j in self.neighbours[queue.popleft()]:
                if j not in seen:
                    seen.add(j)
                    queue.append(j)
        return len(seen) == self.num_nodes

    def complement(self) -> Graph:
        n = self.num_nodes
        everyone = set(range(n))
        return Graph(tuple(tuple(sorted(everyone - set(ns) - {i})) for i, ns in enumerate(self.neighbours)))


def ring(num_nodes: int) -> Graph:
    """Node i next to i - 1 and i + 1 (mod n): degree 2 (1 with two nodes)."""
    if num_nodes < 2:
        raise ValueError("a ring needs at least 2 nodes")
    return Graph.from_edges(num_nodes, ((i, (i + 1) % num_nodes) for i in range(num_nodes)))


def _pair_stubs(num_nodes: int, degree: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    """One Steger-Wormald try: the edges of a `degree`-regular graph, or None when it got stuck."""
    edges: set[tuple[int, int]] = set()
    stubs = np.repeat(np.arange(num_nodes), degree)
    while stubs.size:
        rng.shuffle(stubs)
        left: dict[int, int] = {}  # node -> its stubs that found no partner this pass
        for a, b in stubs.reshape(-1, 2).tolist():
            pair = (min(a, b), max(a, b))
            if a != b and pair not in edges:
                edges.add(pair)
            else:
                left[a] = left.get(a, 0) + 1
                left[b] = left.get(b, 0) + 1
        if left and not any(
            (min(a, b), max(a, b)) not in edges for a in left for b in left if a != b
        ):  # no pair of the nodes left can make a new edge: start over
            return None
        stubs = np.repeat(np.fromiter(left, dtype=np.int64), list(left.values()))
    return edges


def random_regular(num_nodes: int, degree: int, rng: np.random.Generator) -> Graph:
    """A random simple graph where every node has `degree` neighbours (n * k even, k < n): uniform over
    such graphs asymptotically, as n grows at small k (Steger and Wormald 1999), skewed on a few nodes."""
    if not 0 <= degree < num_nodes or (num_nodes * degree) % 2:
        raise ValueError(f"no {degree}-regular graph on {num_nodes} nodes (need k < n and n * k even)")
    if degree > (num_nodes - 1) / 2:
        return random_regular(num_nodes, num_nodes - 1 - degree, rng).complement()
    while True:
        edges = _pair_stubs(num_nodes, degree, rng)
        if edges is not None:
            return Graph.from_edges(num_nodes, edges)


def erdos_renyi(num_nodes: int, edge_probability: float, rng: np.random.Generator) -> Graph:
    """G(n, p): each of the n (n - 1) / 2 pairs an edge with probability p, independently."""
    if not 0.0 <= edge_probability <= 1.0:
        raise ValueError(f"an edge probability is in [0, 1], got {edge_probability}")
    upper = np.triu(rng.random((num_nodes, num_nodes)) < edge_probability, k=1)
    rows, cols = np.nonzero(upper)
    return Graph.from_edges(num_nodes, zip(rows.tolist(), cols.tolist(), strict=True))


def communication_graph(
    kind: GraphKind,
    num_nodes: int,
    *,
    degree: int,
    edge_probability: float,
    rng: np.random.Generator,
    attempts: int = ATTEMPTS,
) -> Graph:
    """The federation's connected graph (`federation.graph`); a random one is redrawn until connected."""
    if kind == "ring":
        return ring(num_nodes)
    for _ in range(attempts):
        graph = (
            random_regular(num_nodes, degree, rng)
            if kind == "k_regular"
            else erdos_renyi(num_nodes, edge_probability, rng)
        )
        if graph.connected():
            return graph
    if kind == "k_regular":
        raise ConfigError(
            f"federation.graph = 'k_regular' with federation.graph_degree = {degree} on {num_nodes} clients "
            f"came out disconnected in {attempts} draws; raise federation.graph_degree (3 or more is "
            "almost always connected) or use federation.graph = 'ring'"
        )
    threshold = np.log(num_nodes) / num_nodes
    raise ConfigError(
        f"federation.graph = 'erdos_renyi' with federation.graph_edge_probability = {edge_probability:g} on "
        f"{num_nodes} clients came out disconnected in {attempts} draws; raise the edge probability well "
        f"above ln(n) / n = {threshold:.3g}, where G(n, p) becomes connected"
    )


def by_client(graph: Graph, client_ids: Sequence[str]) -> dict[str, list[str]]:
    """The neighbour lists by client id (the run directory's graph.json)."""
    return {client_ids[i]: [client_ids[j] for j in ns] for i, ns in enumerate(graph.neighbours)}
