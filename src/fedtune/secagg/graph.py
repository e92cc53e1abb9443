"""The SecAgg+ neighbour graph: a random k-regular graph (a Harary graph over a random order of clients).

Each client masks with, and shares its secrets among, its k neighbours only (Bell et al., CCS 2020); with
k = n - 1 every pair is connected, which is the original SecAgg of Bonawitz et al. (CCS 2017). The graph is
the circulant graph that joins each position to the next k/2 positions on each side, over a uniformly
random order of the client ids; a k-regular graph with k and n both odd does not exist, so that case uses
k + 1. The order is drawn by sorting ids by 128-bit keys from the AES-CTR keystream of a 32-byte seed:
fresh from `secrets` by default, or given (a simulation may derive it from its run seed to be repeatable).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

from fedtune.secagg.prg import SEED_BYTES, keystream

_SORT_KEY_BYTES = 16


def default_neighbours(num_clients: int) -> int:
    """k = 2 * ceil(log2 n), capped at n - 1 (all pairs); even, as a Harary graph prefers."""
    if num_clients <= 1:
        return 0
    return min(2 * math.ceil(math.log2(num_clients)), num_clients - 1)


def effective_neighbours(neighbours: int, num_clients: int) -> int:
    """The degree the graph really has: n - 1 when k >= n - 1, k + 1 when k and n are both odd."""
    if neighbours < 1:
        raise ValueError(f"each client needs at least one neighbour, got {neighbours}")
    if neighbours >= num_clients - 1:
        return num_clients - 1
    if neighbours % 2 and num_clients % 2:
        return neighbours + 1
    return neighbours


def resolve_neighbours(setting: int | str, num_clients: int) -> int:
    """The degree a config's `neighbours` setting gives a round of `num_clients`: "auto" (2 * ceil(log2 n)),
    "all" (n - 1, the original SecAgg) or a number, as the graph will really have it."""
    if setting == "all":
        return num_clients - 1
    k = default_neighbours(num_clients) if setting == "auto" else int(setting)
    return effective_neighbours(k, num_clients)


def shuffled(ids: Iterable[int], seed: bytes) -> list[int]:
    """The ids (sorted first) in the uniformly random order that `seed` determines."""
    ordered = sorted(ids)
    stream = keystream(seed, _SORT_KEY_BYTES * len(ordered))
    keys = [stream[i * _SORT_KEY_BYTES : (i + 1) * _SORT_KEY_BYTES] for i in range(len(ordered))]
    return [cid for _, cid in sorted(zip(keys, ordered, strict=True))]


def neighbour_graph(
    ids: Iterable[int], neighbours: int, seed: bytes | None = None
) -> dict[int, frozenset[int]]:
    """Each id's neighbours in a random k-regular graph over `ids` (all pairs when k >= n - 1)."""
    order = sorted(set(ids))
    n = len(order)
    if n < 2:
        raise ValueError("a neighbour graph needs at least two clients")
    k = effective_neighbours(neighbours, n)
    if k == n - 1:
        return {u: frozenset(v for v in order if v != u) for u in order}
    order = shuffled(order, secrets.token_bytes(SEED_BYTES) if seed is None else seed)
    offsets = list(range(1, k // 2 + 1))
    if k % 2:  # n is even here: join each position to the opposite one
        offsets.append(n // 2)
    adjacency: dict[int, set[int]] = {u: set() for u in order}
    for pos, u in enumerate(order):
        for offset in offsets:
            v = order[(pos + offset) % n]
            adjacency[u].add(v)
            adjacency[v].add(u)
    return {u: frozenset(vs) for u, vs in adjacency.items()}
