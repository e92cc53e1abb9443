"""Accounting: epsilon equals dp_accounting's on hand-built events, calibration round-trips, the budget stop
lands on the right round, checkpoints resume exactly, and the Skellam curve is right."""

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedtune.errors import ConfigError
from fedtune.privacy.accountant import (
    Accountant,
    GaussianRound,
    Sampling,
    SkellamRound,
    calibrate_noise_multiplier,
    rounds_within_budget,
)
from fedtune.privacy.skellam import (
    SKELLAM_ORDERS,
    SkellamDpEvent,
    SkellamRdpAccountant,
    l1_sensitivity_bound,
    poisson_subsampled_rdp,
    skellam_rdp,
    without_replacement_rdp,
)

DELTA = 1e-5
REL = dpa.NeighboringRelation


def hand_built(kind: str, sampling: str, z: float, rounds: int, n: int = 200, k: int = 10) -> float:
    """The same accounting written directly against dp_accounting, independent of fedtune."""
    if sampling == "poisson":
        event = dpa.PoissonSampledDpEvent(k / n, dpa.GaussianDpEvent(z))
        relation = REL.ADD_OR_REMOVE_ONE
    elif sampling == "fixed":  # replace-one: sensitivity 2C, i.e. noise multiplier z / 2
        event = dpa.SampledWithoutReplacementDpEvent(n, k, dpa.GaussianDpEvent(z / 2))
        relation = REL.REPLACE_ONE
    else:
        event, relation = dpa.GaussianDpEvent(z), REL.ADD_OR_REMOVE_ONE
    accountant = (
        rdp.RdpAccountant(neighboring_relation=relation) if kind == "rdp" else pld.PLDAccountant(relation)
    )
    return accountant.compose(dpa.SelfComposedDpEvent(event, rounds)).get_epsilon(DELTA)


@pytest.mark.parametrize(
    "kind,sampling,z",
    [("rdp", "poisson", 1.1), ("pld", "poisson", 1.1), ("rdp", "fixed", 2.0), ("rdp", "none", 8.0)],
)
def test_epsilon_matches_dp_accounting_computed_independently(kind, sampling, z):
    accountant = Accountant(kind, Sampling(sampling, 200, 10))
    for _ in range(3):
        accountant.step(GaussianRound(z))
    accountant.step(GaussianRound(z), rounds=7)
    assert accountant.rounds == 10
    expected = hand_built(kind, sampling, z, 10)
    assert accountant.epsilon(DELTA) == pytest.approx(expected, rel=0.01)
    assert 0 < expected < math.inf


def test_pld_with_fixed_size_sampling_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="PLD accountant has no sampling without replacement"):
        Accountant("pld", Sampling("fixed", 200, 10))


def test_known_cohort_epsilon_has_no_amplification():
    accountant = Accountant("rdp", Sampling("poisson", 200, 10))
    accountant.step(GaussianRound(1.5), rounds=10)
    assert accountant.epsilon_known_cohort(DELTA) == pytest.approx(hand_built("rdp", "none", 1.5, 10))
    assert accountant.epsilon_known_cohort(DELTA) > accountant.epsilon(DELTA)
    fixed = Accountant("rdp", Sampling("fixed", 200, 10))  # keeps replace-one: sensitivity 2C, i.e. z / 2
    fixed.step(GaussianRound(1.5), rounds=10)
    assert fixed.epsilon_known_cohort(DELTA) == pytest.approx(hand_built("rdp", "none", 0.75, 10))
    assert fixed.epsilon_known_cohort(DELTA) > fixed.epsilon(DELTA)


def test_a_sampled_epsilon_is_never_above_the_unsampled_one():
    """Sampling without replacement's RDP bound is looser than none at 48 of 66 (22.35 against 21.44 at
    z = 1, 3 rounds): the accountant reports the tighter of the two, as both hold."""
    accountant = Accountant("rdp", Sampling("fixed", 66, 48))
    accountant.step(GaussianRound(1.0), 3)
    assert accountant.epsilon(1e-5) == pytest.approx(accountant.epsilon_known_cohort(1e-5))
    small = Accountant("rdp", Sampling("fixed", 200, 10))  # a small fraction: amplification wins
    small.step(GaussianRound(1.0), 3)
    assert small.epsilon(1e-5) < 0.5 * small.epsilon_known_cohort(1e-5)


def test_calibration_round_trips():
    sampling = Sampling("poisson", 200, 10)
    z = calibrate_noise_multiplier(2.0, DELTA, 30, sampling)
    spent = hand_built("rdp", "poisson", z, 30)
    assert 0.98 * 2.0 <= spent <= 2.0  # within the budget, and close to it
    assert hand_built("rdp", "poisson", z * 0.99, 30) > 2.0  # a smaller z would overspend


def test_calibration_and_rounds_use_the_bound_the_accountant_reports():
    """At 48 of 66 the unsampled bound is the tighter one: the noise is calibrated to it (less noise than
    the sampled bound alone asks for), and the run it plans spends close to, not over, the target."""
    sampling = Sampling("fixed", 66, 48)
    z = calibrate_noise_multiplier(4.0, DELTA, 5, sampling)
    assert z == pytest.approx(calibrate_noise_multiplier(4.0, DELTA, 5, sampling.without_amplification()))
    assert hand_built("rdp", "fixed", z, 5, n=66, k=48) > 4.0  # the sampled bound alone would overspend
    planned = Accountant("rdp", sampling)
    planned.step(GaussianRound(z), rounds=5)
    assert 0.98 * 4.0 <= planned.epsilon(DELTA) <= 4.0
    assert rounds_within_budget(GaussianRound(z), 4.0, DELTA, sampling) == 5


def test_would_exceed_stops_at_the_right_round():
    sampling, z = Sampling("poisson", 200, 10), 1.0
    budget = hand_built("rdp", "poisson", z, 7) * 1.0001  # exactly 7 rounds fit
    accountant = Accountant("rdp", sampling)
    ran = 0
    while not accountant.would_exceed(GaussianRound(z), budget, DELTA):
        accountant.step(GaussianRound(z))
        ran += 1
        assert ran < 50
    assert ran == 7 and accountant.epsilon(DELTA) <= budget
    assert accountant.epsilon_after(GaussianRound(z), DELTA) > budget
    assert rounds_within_budget(GaussianRound(z), budget, DELTA, sampling) == 7


def test_state_dict_round_trips_and_resumes_to_the_same_epsilon():
    accountant = Accountant("rdp", Sampling("fixed", 200, 10))
    accountant.step(GaussianRound(2.0), rounds=4)
    accountant.step(GaussianRound(2.5), rounds=2)  # e.g. a changed noise multiplier
    state = json.loads(json.dumps(accountant.state_dict()))
    resumed = Accountant.from_state_dict(state)
    assert resumed.history == accountant.history
    assert resumed.epsilon(DELTA) == accountant.epsilon(DELTA)
    for a in (accountant, resumed):
        a.step(GaussianRound(2.5), rounds=3)
    assert resumed.epsilon(DELTA) == accountant.epsilon(DELTA)
    assert resumed.state_dict() == accountant.state_dict()


# --- Skellam ---------------------------------------------------------------------------------------------


def test_skellam_rdp_matches_the_papers_real_domain_form():
    """The curve as Agarwal et al. state it for real-valued inputs scaled by s (sensitivities l1, l2 and
    variance mu in real units), against this module's integer-domain form."""
    s, l1, l2, mu = 37.0, 2.5, 0.8, 0.09
    a = np.arange(2, 40, dtype=np.float64)
    paper = a / (2 * mu) * l2**2 + np.minimum(
        ((2 * a - 1) * s * l2**2 + 6 * l1) / (4 * s**3 * mu**2), 3 * l1 / (2 * s * mu)
    )
    ours = skellam_rdp(a, SkellamDpEvent(variance=s**2 * mu, l2_sensitivity=s * l2, l1_sensitivity=s * l1))
    np.testing.assert_allclose(ours, paper, rtol=1e-12)


def test_skellam_tends_to_the_gaussian_for_large_variance():
    z, l2, dim, rounds = 1.3, 5_000.0, 10_000, 20
    event = SkellamDpEvent((z * l2) ** 2, l2, l1_sensitivity_bound(l2, dim))
    skellam = SkellamRdpAccountant().compose(dpa.SelfComposedDpEvent(event, rounds)).get_epsilon(DELTA)
    gauss = rdp.RdpAccountant(orders=SKELLAM_ORDERS)
    gauss.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), rounds))
    assert skellam == pytest.approx(gauss.get_epsilon(DELTA), rel=0.01)
    assert skellam >= gauss.get_epsilon(DELTA)  # the discrete noise never accounts as cheaper


def test_general_sampling_bounds_are_upper_bounds_of_the_exact_gaussian_ones():
    """Applied to the Gaussian's curve, the general amplification bounds used for Skellam must never
    undercut dp_accounting's exact Gaussian computations, and should not be far above them."""
    orders, z, q, rounds = SKELLAM_ORDERS, 1.0, 0.05, 50
    compute_epsilon = rdp.rdp_privacy_accountant.compute_epsilon
    for general, exact in (
        (
            poisson_subsampled_rdp(orders, q, lambda a: a / (2 * z**2)),
            rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, orders),
        ),
        (
            without_replacement_rdp(orders, q, lambda a: a / (2 * z**2)),
            rdp.rdp_privacy_accountant._compute_rdp_sample_wor_gaussian(q, z, orders),
        ),
    ):
        assert np.all(general >= exact * (1 - 1e-9))
        loose = compute_epsilon(orders, rounds * general, DELTA)[0]
        tight = compute_epsilon(orders, rounds * exact, DELTA)[0]
        assert tight <= loose <= 1.3 * tight


def test_distributed_accounting_composes_skellam_through_dp_accounting():
    sampling = Sampling("fixed", 100, 8)
    round_ = SkellamRound(variance=(1.5 * 3000.0) ** 2, l2_sensitivity=3000.0 + 30.0, dim=900)
    accountant = Accountant("rdp", sampling)
    accountant.step(round_, rounds=5)
    l2 = 2 * round_.l2_sensitivity  # replace-one
    event = SkellamDpEvent(round_.variance, l2, l1_sensitivity_bound(l2, 900))
    by_hand = SkellamRdpAccountant(neighboring_relation=REL.REPLACE_ONE)
    by_hand.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(100, 8, event), 5))
    assert accountant.epsilon(DELTA) == pytest.approx(by_hand.get_epsilon(DELTA), rel=1e-12)
    with pytest.raises(ConfigError, match="no privacy loss distribution"):
        Accountant("pld", Sampling("poisson", 100, 8)).step(round_)
    z = calibrate_noise_multiplier(
        4.0, DELTA, 5, sampling, mechanism_for=lambda x: SkellamRound((x * 3000.0) ** 2, 3030.0, 900)
    )
    calibrated = Accountant("rdp", sampling)
    calibrated.step(SkellamRound((z * 3000.0) ** 2, 3030.0, 900), rounds=5)
    assert 0.98 * 4.0 <= calibrated.epsilon(DELTA) <= 4.0
