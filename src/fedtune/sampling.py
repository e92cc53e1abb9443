"""Client sampling: which clients take part in a round, drawn from a seeded generator."""

from __future__ import annotations

import numpy as np

from fedtune.config import FederationConfig


def clients_per_round(cfg: FederationConfig, population: int) -> int:
    """The round's cohort size: a count, or a fraction of the population (at least one client)."""
    if cfg.fraction_per_round is not None:
        return max(1, round(cfg.fraction_per_round * population))
    return min(cfg.clients_per_round, population)


def sample_clients(population: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` distinct client indices out of `population`, sorted, uniformly without replacement."""
    if not 1 <= k <= population:
        raise ValueError(f"cannot sample {k} clients out of {population}")
    return np.sort(rng.choice(population, size=k, replace=False))
