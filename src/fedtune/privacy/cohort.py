"""Who takes part in a DP round: the draw the accountant's sampling assumes, from a generator passed in.

`fixed` is fedtune's own `sampling.sample_clients` (k of n without replacement); `poisson` includes each
client independently with probability q, so a round's cohort size varies and may be empty or one client
(a secure round then aborts; the round is still accounted, which only overstates the spend). For the
amplification the accountant credits, the draw must be unpredictable to the adversary: pass
`noise.os_entropy_rng()`, not a generator derived from `run.seed`, and keep `client_ids` out of anything
published; otherwise report `epsilon_known_cohort`.
"""

from __future__ import annotations

import numpy as np


def poisson_cohort(population: int, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the clients sampled, each independently with `probability`."""
    if population < 1 or not 0 < probability <= 1:
        raise ValueError(f"cannot Poisson-sample a population of {population} with probability {probability}")
    return np.flatnonzero(rng.random(population) < probability)
