"""Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021): track a quantile of the update norms.

Each round every client also reports whether its delta's norm was at most the current clip C, as
b_i - 1/2 in {-1/2, +1/2} (so one client moves the count by at most 1/2). The server adds N(0, sigma_b^2)
to the sum, divides by the expected number of clients m and adds 1/2 back: a private estimate of the
fraction unclipped. The geometric update

    C <- C * exp(-clip_lr * (unclipped_fraction - target_quantile))

shrinks C when more clients than the target fit under it and grows it otherwise. The count is a second
Gaussian query on the same clients, so the delta noise is raised to keep the total cost at the configured
noise multiplier z (the paper's Theorem 1):

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2),   which needs 2 sigma_b > z.

The accountant then accounts one Gaussian mechanism with multiplier z. Andrew et al. recommend
sigma_b = m / 20 and clip_lr = 0.2 with target_quantile = 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.errors import ConfigError
from fedtune.privacy.noise import gaussian


@dataclass(frozen=True)
class ClipState:
    """The adaptive clip's state between rounds: the current L2 clip norm."""

    clip_l2_norm: float


def default_clipped_count_stddev(expected_clients: float) -> float:
    """Andrew et al.'s recommendation, as in TensorFlow Federated: 5% of the expected cohort."""
    return 0.05 * expected_clients


def delta_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The noise multiplier for the deltas so that deltas and count together cost `noise_multiplier`."""
    if clipped_count_stddev <= 0 or noise_multiplier >= 2 * clipped_count_stddev:
        raise ConfigError(
            f"privacy.clipped_count_stddev = {clipped_count_stddev:g} is too small for "
            f"privacy.noise_multiplier = {noise_multiplier:g}: adaptive clipping needs "
            f"2 x clipped_count_stddev > noise_multiplier; raise clipped_count_stddev above "
            f"{noise_multiplier / 2:g} or lower the noise multiplier"
        )
    return (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5


def noised_unclipped_fraction(
    unclipped: int,
    reported: int,
    expected_clients: float,
    clipped_count_stddev: float,
    generator: torch.Generator,
) -> float:
    """The private estimate of the fraction of clients whose norm was <= C, clamped to [0, 1].

    `unclipped` of the `reported` clients fit under C; each reports b - 1/2, so the noised sum is
    (unclipped - reported / 2) + N(0, sigma_b^2), divided by the expected cohort (public), plus 1/2."""
    if not 0 <= unclipped <= reported:
        raise ValueError(f"{unclipped} unclipped out of {reported} reported")
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be positive, got {expected_clients}")
    centred = unclipped - reported / 2 + float(gaussian(1, clipped_count_stddev, generator)[0])
    return min(1.0, max(0.0, centred / expected_clients + 0.5))


def next_clip(
    state: ClipState, unclipped_fraction: float, target_quantile: float, clip_lr: float
) -> ClipState:
    """The geometric update: C * exp(-clip_lr * (unclipped_fraction - target_quantile))."""
    if not 0 < target_quantile < 1:
        raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
    return ClipState(state.clip_l2_norm * math.exp(-clip_lr * (unclipped_fraction - target_quantile)))
