"""Adaptive clipping moves C toward the target quantile; the noise split keeps the configured cost;
one run's DP state (ClientLevelDp) accounts, stops on budget and resumes from a checkpoint."""

import math

import numpy as np
import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.privacy.accountant import Sampling
from fedtune.privacy.adaptive import (
    ClipState,
    default_clipped_count_stddev,
    delta_noise_multiplier,
    next_clip,
    noised_unclipped_fraction,
)
from fedtune.privacy.clip import clip_l2
from fedtune.privacy.dpfedavg import ClientLevelDp
from fedtune.privacy.plan import PrivacyPlan


@pytest.mark.parametrize("start", [0.01, 100.0])
@pytest.mark.parametrize("quantile", [0.3, 0.7])
def test_clip_moves_to_the_target_quantile_of_synthetic_norms(start, quantile):
    rng = np.random.Generator(np.random.PCG64(1))
    generator = torch.Generator().manual_seed(2)
    cohort = 100
    stddev = default_clipped_count_stddev(cohort)
    state = ClipState(start)
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=cohort)  # true quantile q: exp(0.5 * Phi^-1(q))
        unclipped = int((norms <= state.clip_l2_norm).sum())
        fraction = noised_unclipped_fraction(unclipped, cohort, cohort, stddev, generator)
        state = next_clip(state, fraction, quantile, clip_lr=0.2)
    true = float(np.quantile(rng.lognormal(0.0, 0.5, 200_000), quantile))
    assert state.clip_l2_norm == pytest.approx(true, rel=0.25)


def test_the_noised_fraction_is_centred_and_clamped():
    generator = torch.Generator().manual_seed(0)
    draws = [noised_unclipped_fraction(30, 100, 100, 5.0, generator) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(0.30, abs=5 * 0.05 / math.sqrt(4000))
    assert np.std(draws) == pytest.approx(0.05, rel=0.1)  # sigma_b / expected clients
    assert noised_unclipped_fraction(100, 100, 1, 0.1, generator) == 1.0
    with pytest.raises(ValueError):
        noised_unclipped_fraction(5, 4, 4, 0.1, generator)


def test_delta_noise_keeps_the_total_cost():
    z, sigma_b = 1.0, 2.0
    z_delta = delta_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)  # Andrew et al., Theorem 1
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        delta_noise_multiplier(1.0, 0.5)


def _plan(**changes):
    base = dict(
        mode="central",
        sampling=Sampling("poisson", 100, 10),
        accountant="rdp",
        delta=1e-3,
        noise_multiplier=1.0,
        target_epsilon=None,
        clip_l2_norm=0.5,
        adaptive_clipping=False,
        target_quantile=0.5,
        clip_lr=0.2,
        clipped_count_stddev=None,
        delta_noise_multiplier=1.0,
    )
    return PrivacyPlan(**{**base, **changes})


def test_a_central_round_noises_the_sum_accounts_and_stops_on_budget():
    dp = ClientLevelDp(_plan(target_epsilon=1.5), torch.Generator().manual_seed(0))
    assert dp.client_clip_l2_norm == 0.5  # no quantization margin in the clear
    clipped = [clip_l2(d, dp.client_clip_l2_norm) for d in (torch.full((1000,), 1.0), torch.zeros(1000))]
    assert [c.clipped for c in clipped] == [True, False]
    total = sum(c.delta.double() for c in clipped)
    noised = dp.add_noise(total)
    noise_std = float((noised - total).std())  # the noise on the sum has std z * C
    assert noise_std == pytest.approx(1.0 * 0.5, rel=0.15)
    assert torch.allclose(dp.mean(noised), (noised / 10).float())  # over the public expected cohort
    rounds = 0
    while dp.round_fits_budget():
        metrics = dp.end_round()
        rounds += 1
        assert metrics.epsilon <= 1.5 and metrics.epsilon_known_cohort > metrics.epsilon
    assert rounds >= 1 and dp.accountant.epsilon_after(dp.plan.mechanism(), 1e-3) > 1.5
    resumed = ClientLevelDp.from_state_dict(dp.plan, dp.state_dict(), torch.Generator())
    assert resumed.accountant.epsilon(1e-3) == dp.accountant.epsilon(1e-3)


def test_adaptive_rounds_move_the_clip_and_log_the_noised_fraction():
    plan = _plan(
        adaptive_clipping=True,
        clipped_count_stddev=2.0,
        delta_noise_multiplier=delta_noise_multiplier(1.0, 2.0),
    )
    dp = ClientLevelDp(plan, torch.Generator().manual_seed(0))
    metrics = dp.end_round(unclipped=10, reported=10)  # everyone fit: C shrinks
    assert dp.clip_l2_norm < 0.5 and 0 <= metrics.unclipped_fraction <= 1
    assert metrics.clip_l2_norm == 0.5  # the C that round used
    state = dp.state_dict()
    assert ClientLevelDp.from_state_dict(plan, state, torch.Generator()).clip_l2_norm == dp.clip_l2_norm
