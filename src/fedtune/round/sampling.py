"""Who takes part: each round's cohort, and the clients that evaluate the global adapter.

Without client-level DP the cohort is drawn from the run's seed, named by the round, so a run repeats
exactly. Under DP the draw is part of the guarantee (amplification by sampling): it comes from the
`DpRandomness` generator (the OS outside tests), fixed-size or Poisson as the accountant assumes.
"""

from __future__ import annotations

import numpy as np

from fedtune.privacy.cohort import poisson_cohort
from fedtune.privacy.plan import PrivacyPlan
from fedtune.seeding import numpy_rng


def cohort_size(population: int, clients_per_round: int, fraction_per_round: float | None) -> int:
    """The round's cohort size: a count, or a fraction of the population (at least one client)."""
    if fraction_per_round is not None:
        return max(1, round(fraction_per_round * population))
    return min(clients_per_round, population)


def sample_clients(population: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` distinct client indices out of `population`, sorted, uniformly without replacement."""
    if not 1 <= k <= population:
        raise ValueError(f"cannot sample {k} clients out of {population}")
    return np.sort(rng.choice(population, size=k, replace=False))


def draw_cohort(
    round_num: int,
    population: int,
    selected: int,
    *,
    seed: int,
    privacy: PrivacyPlan | None = None,
    dp_rng: np.random.Generator | None = None,
) -> list[int]:
    """The population indices selected in `round_num`, sorted."""
    if privacy is None:
        return sample_clients(population, selected, numpy_rng(seed, "sample", round_num)).tolist()
    if dp_rng is None:
        raise ValueError("a DP cohort is drawn from a generator the caller passes (the OS outside tests)")
    if privacy.sampling.kind == "poisson":
        return poisson_cohort(population, privacy.sampling.probability, dp_rng).tolist()
    return sample_clients(population, selected, dp_rng).tolist()


def eval_members(population: int, max_clients: int | str, seed: int) -> tuple[int, ...]:
    """The population indices that evaluate: everyone, or a fixed subset drawn from the run seed."""
    if max_clients == "all" or int(max_clients) >= population:
        return tuple(range(population))
    return tuple(sample_clients(population, int(max_clients), numpy_rng(seed, "eval")).tolist())
