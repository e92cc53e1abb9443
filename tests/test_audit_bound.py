"""The one-run epsilon lower bound against reference numbers, closed forms and its invariants."""

import math
from itertools import pairwise

import numpy as np
import pytest
import scipy.stats

from fedtune.audit.bound import audit_scores, epsilon_lower_bound, p_value, pure_bound


def _naive_p_value(m, guesses, correct, eps, delta):
    """Steinke et al. 2023, Theorem 3, as a loop (the form of jax_privacy's test `_one_run_p_value_naive`)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = scipy.stats.binom.sf(correct - 1, guesses, q)
    alpha, cumulative = 0.0, 0.0
    for i in range(1, correct + 1):
        cumulative += scipy.stats.binom.pmf(correct - i, guesses, q)
        alpha = max(alpha, cumulative / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def _deterministic_normal(mu, n):
    return scipy.stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


@pytest.mark.parametrize(
    ("m", "guesses", "correct", "eps", "delta"),
    [(100, 10, 9, 0.5, 1e-3), (1000, 100, 90, 1.0, 1e-5), (1000, 100, 70, 0.3, 1e-2), (64, 30, 30, 2.0, 0.0)],
)
def test_p_value_is_theorem_3(m, guesses, correct, eps, delta):
    assert p_value(m, guesses, correct, eps, delta) == pytest.approx(
        _naive_p_value(m, guesses, correct, eps, delta)
    )


@pytest.mark.parametrize("guesses", [5, 20, 64])
def test_all_correct_pure_bound_has_a_closed_form(guesses):
    # P[Binomial(r, q) >= r] = q^r = alpha  ->  q = alpha^(1/r), eps = log(q / (1 - q))
    q = 0.05 ** (1 / guesses)
    assert epsilon_lower_bound(guesses, guesses, guesses, confidence=0.95) == pytest.approx(
        math.log(q / (1 - q))
    )


@pytest.mark.parametrize(
    ("m", "guesses", "correct", "delta", "expected"),
    [  # jax_privacy auditing._epsilon_one_run(0, m, r, v, 0.05, delta) at google-deepmind/jax_privacy@8967688
        (100, 10, 10, 0.0, 1.0518732154273494),
        (100, 10, 10, 1e-3, 0.6137932929134876),
        (1000, 200, 180, 1e-5, 1.796285070718516),
        (64, 28, 28, 1e-5, 2.1791355799228658),
        (64, 20, 20, 1e-2, 0.0),  # 2 m delta > 1: nothing is refuted
    ],
)
def test_bound_matches_jax_privacy(m, guesses, correct, delta, expected):
    assert epsilon_lower_bound(m, guesses, correct, confidence=0.95, delta=delta) == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize(
    ("shift", "expected"), [(0.0, 0.0), (1.0, 1.13346), (2.0, 2.311945), (4.0, 4.395568)]
)
def test_threshold_search_matches_jax_privacy(shift, expected):
    # jax_privacy's tests/auditing_test.py `test_epsilon_one_run_close`: 10,000 canaries in, 10,000 out,
    # deterministic normal scores, significance 0.05, delta 1e-6, Bonferroni over thresholds
    n = 10_000
    scores = np.concatenate([_deterministic_normal(shift, n), _deterministic_normal(0.0, n)])
    included = np.arange(2 * n) < n
    audit = audit_scores(scores, included, confidence=0.95, delta=1e-6)
    assert audit.epsilon == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert audit.canaries == 2 * n and audit.included == n


def test_the_bound_grows_with_correct_guesses_and_shrinks_with_confidence_and_delta():
    bounds = [epsilon_lower_bound(100, 40, v, confidence=0.95, delta=1e-4) for v in range(20, 41)]
    assert all(a <= b for a, b in pairwise(bounds)) and bounds[-1] > bounds[0]
    by_confidence = [epsilon_lower_bound(100, 40, 38, confidence=c) for c in (0.5, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in pairwise(by_confidence))
    by_delta = [epsilon_lower_bound(100, 40, 38, delta=d) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert all(a >= b for a, b in pairwise(by_delta)) and by_delta[0] > by_delta[-1]


def test_no_evidence_no_bound():
    assert epsilon_lower_bound(100, 0, 0) == 0.0
    assert epsilon_lower_bound(100, 40, 20) == 0.0  # chance accuracy
    assert pure_bound(np.array([10, 10]), np.array([0, 5]), 0.05).tolist() == [0.0, 0.0]
    rng = np.random.default_rng(0)
    assert audit_scores(rng.normal(size=200), rng.random(200) < 0.5).epsilon < 0.5


def test_the_threshold_is_chosen_from_the_scores():
    included = np.array([True] * 20 + [False] * 20)
    scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.1, 40)
    audit = audit_scores(scores, included, confidence=0.95)
    assert (audit.guesses, audit.correct) == (20, 20)
    assert audit.epsilon == pytest.approx(
        epsilon_lower_bound(40, 20, 20, confidence=1 - 0.05 / audit.thresholds)
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: epsilon_lower_bound(10, 5, 6),
        lambda: epsilon_lower_bound(10, 11, 3),
        lambda: epsilon_lower_bound(10, 5, 3, confidence=1.0),
        lambda: audit_scores(np.array([1.0, np.nan]), np.array([True, False])),
        lambda: audit_scores(np.array([1.0, 2.0]), np.array([True])),
    ],
)
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()
