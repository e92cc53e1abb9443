"""Noise for differential privacy: continuous Gaussian for the server, discrete Skellam for each client.

Every draw comes from a generator the caller passes in, and the only generators made here are seeded from
the operating system (`secrets`): DP noise must be unpredictable, so it is never derived from `run.seed`
(which the run directory publishes), never drawn from a global RNG, and a DP run is not bit-reproducible.

- `gaussian`: central DP-FedAvg (McMahan et al. 2018), added by the server to the sum of clipped deltas,
  standard deviation `noise_multiplier * clip_l2_norm`.
- `skellam`: the difference of two independent Poisson(variance / 2) draws (Agarwal, Kairouz and Liu 2021),
  integer-valued, mean 0, the given variance. Poissons add up, so n clients each adding
  Skellam(variance / n) give a sum that is exactly Skellam(variance): each client adds its share to its
  integer-encoded update before secure aggregation masks it, and the server only ever sees the noised sum.

Not hardened against floating-point attacks on the continuous Gaussian (Mironov 2012) or against recovery
of the PRNG state from outputs: the generators are PCG64 (numpy) and Mersenne Twister (torch), seeded with
128 and 64 bits of OS entropy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch

_MAX_POISSON_RATE = 1e15  # numpy's Poisson sampler refuses rates near 2^63; stay well below


def os_entropy_generator() -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS: for DP noise, never seeded from the run seed."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(64))
    return generator


def os_entropy_rng() -> np.random.Generator:
    """A numpy PCG64 generator seeded with 128 bits from the OS (for discrete noise and cohort draws)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def gaussian(shape: Sequence[int] | int, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise of `shape`, float32, drawn from `generator`."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"the noise standard deviation must be finite and non-negative, got {std}")
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    noise = torch.randn(size, generator=generator, dtype=torch.float32)
    return noise.mul_(std)


def skellam(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of symmetric Skellam noise with the given variance: int64, Poisson(v/2) - Poisson(v/2)."""
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"the noise variance must be finite and non-negative, got {variance}")
    rate = variance / 2
    if rate > _MAX_POISSON_RATE:
        raise ValueError(f"a Skellam variance of {variance:.3g} is beyond the Poisson sampler's range")
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    return rng.poisson(rate, size).astype(np.int64) - rng.poisson(rate, size).astype(np.int64)


def client_share_variance(total_variance: float, min_contributors: int) -> float:
    """The Skellam variance each client adds so that any `min_contributors` or more of them reach
    `total_variance` in their sum (fewer contributors leave less noise: account for what was added)."""
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be at least 1, got {min_contributors}")
    return total_variance / min_contributors
