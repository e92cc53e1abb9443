"""Noise: the Gaussian's std and the Skellam shares' variance match; generators come from OS entropy;
distributed noise survives secure aggregation's integer encoding and decodes exactly."""

import math

import numpy as np
import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.privacy.distributed import (
    DistributedNoise,
    add_noise_to_payload,
    check_headroom,
    decode_noised_sum,
)
from fedtune.privacy.noise import (
    client_share_variance,
    gaussian,
    os_entropy_generator,
    os_entropy_rng,
    skellam,
)
from fedtune.secagg.fixedpoint import FixedPoint, encode

N = 1_000_000


def test_gaussian_std_matches_the_configured_one():
    std = 0.37
    noise = gaussian(N, std, torch.Generator().manual_seed(3))
    assert noise.dtype == torch.float32 and noise.shape == (N,)
    draws = noise.double()
    # sample std ~ N(std, std^2 / 2N), sample mean ~ N(0, std^2 / N): five standard errors each
    assert abs(float(draws.std()) / std - 1) < 5 / math.sqrt(2 * N)
    assert abs(float(draws.mean())) < 5 * std / math.sqrt(N)
    assert gaussian((2, 3), 1.0, torch.Generator()).shape == (2, 3)
    with pytest.raises(ValueError):
        gaussian(3, -1.0, torch.Generator())


def test_skellam_is_integer_centred_with_the_configured_variance():
    variance = 50.3
    x = skellam(N, variance, np.random.Generator(np.random.PCG64(7)))
    assert x.dtype == np.int64 and x.shape == (N,)
    assert abs(x.mean()) < 5 * math.sqrt(variance / N)
    # the sample variance's std is sqrt((mu4 - v^2) / N), with mu4 = 3 v^2 + v for a Skellam
    assert abs(x.var() - variance) < 5 * math.sqrt((2 * variance**2 + variance) / N)
    with pytest.raises(ValueError):
        skellam(3, math.inf, os_entropy_rng())


def test_the_sum_of_client_shares_has_the_target_variance():
    total, clients, size = 1234.5, 7, 200_000
    rng = np.random.Generator(np.random.PCG64(11))
    share = client_share_variance(total, clients)
    summed = sum(skellam(size, share, rng) for _ in range(clients))
    assert abs(summed.mean()) < 5 * math.sqrt(total / size)
    assert abs(summed.var() / total - 1) < 5 * math.sqrt(2 / size)


def test_generators_come_from_os_entropy():
    a, b = os_entropy_generator(), os_entropy_generator()
    assert a.initial_seed() != b.initial_seed()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    assert not np.array_equal(os_entropy_rng().integers(0, 2**62, 4), os_entropy_rng().integers(0, 2**62, 4))


def test_distributed_noise_plan_in_the_integer_domain():
    spec = FixedPoint(bits=16, clip_range=0.1, max_weight=1, max_clients=4)
    plan = DistributedNoise(
        clip_l2_norm=0.1, noise_multiplier=1.2, step=spec.step, dim=100, min_contributors=4
    )
    assert plan.l2_sensitivity == pytest.approx(0.1 / spec.step + 10)
    assert plan.total_variance == pytest.approx((1.2 * 0.1 / spec.step) ** 2)
    assert plan.client_variance * 4 == pytest.approx(plan.total_variance)
    assert plan.real_std(4) == pytest.approx(1.2 * 0.1)  # the central noise std, on the decoded real sum
    assert plan.mechanism(3).variance == pytest.approx(plan.total_variance * 3 / 4)  # a dropout: less noise
    assert plan.share(os_entropy_rng()).dtype == np.int64


def test_noised_payloads_decode_exactly_even_when_the_noise_wraps():
    spec = FixedPoint(bits=12, clip_range=0.5, max_weight=1, max_clients=3)
    rng = np.random.Generator(np.random.PCG64(5))
    deltas = [np.array([-0.5, -0.49, 0.0, 0.3, 0.5], dtype=np.float32) * s for s in (1.0, 0.5, -1.0)]
    payloads = [encode(d, 1, spec, rng) for d in deltas]
    noises = [np.array([-5000, -3, 0, 7, 5000], dtype=np.int64) * k for k in (1, 2, 3)]  # pushes below 0
    total = np.zeros_like(payloads[0])
    for p, z in zip(payloads, noises, strict=True):
        total += add_noise_to_payload(p, z)  # uint32 arithmetic wraps mod 2^32, as secure aggregation does
    decoded = decode_noised_sum(total, spec)
    assert decoded.contributors == 3
    plain = sum(p[:-2].astype(np.int64) for p in payloads)  # the noiseless integer sum
    expected = (plain + sum(noises)) * spec.step - 3 * spec.clip_range
    np.testing.assert_allclose(decoded.total, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(decoded.total - sum(noises) * spec.step, sum(deltas), atol=3 * spec.step)


def test_headroom_refuses_noise_that_could_wrap():
    for bits, fits in ((28, False), (24, True)):  # 4 x 2^bits / 2 + 8 x 5 x 2^bits / 2 < 2^31?
        spec = FixedPoint(bits=bits, clip_range=0.1, max_weight=1, max_clients=4)
        plan = DistributedNoise(0.1, 5.0, spec.step, 10, min_contributors=4)
        if fits:
            check_headroom(4, spec, plan)
        else:
            with pytest.raises(ConfigError, match="no room for the distributed noise"):
                check_headroom(4, spec, plan)


def test_poisson_cohorts_have_the_expected_size():
    from fedtune.privacy.cohort import poisson_cohort

    rng = np.random.Generator(np.random.PCG64(2))
    sizes = [len(poisson_cohort(1000, 0.05, rng)) for _ in range(2000)]
    assert np.mean(sizes) == pytest.approx(50, abs=5 * math.sqrt(47.5 / 2000))
    cohort = poisson_cohort(10, 1.0, rng)
    assert cohort.tolist() == list(range(10))
