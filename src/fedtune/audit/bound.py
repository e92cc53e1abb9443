"""The epsilon lower bound of a one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023): pure numpy/scipy.

m canaries are each included with probability 1/2, independently; after the run the auditor guesses
"included" for the r highest-scoring canaries and counts the v guesses that are right. If the run is
epsilon-DP in each canary, the number of right guesses is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) (their Theorem 2), so

    p(eps) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]

is a p-value for the claim "the run is eps-DP", and the lower bound at significance alpha = 1 - confidence
is the largest eps whose claim is still refuted: p(eps) <= alpha. With delta = 0 that is a quantile of a
beta distribution (Clopper-Pearson), computed for every candidate r at once (`pure_bound`). Under
(eps, delta)-DP their Theorem 3 adds 2 m delta max_i (P[W >= v - i] - P[W >= v]) / i to the p-value
(`p_value`, the form jax_privacy's `auditing._one_run_p_value` computes); the bound is then found by
root-finding (`epsilon_lower_bound`).

`audit_scores` picks r from the scores themselves, as jax_privacy's `CanaryScoreAuditor.epsilon_one_run`
does by default: every threshold on the upper concave hull of the (false-negative, true-negative) count
curve is a candidate (the others are linearly dominated), and alpha is divided among them (Bonferroni),
so choosing the best threshold after seeing the scores keeps the confidence. Guesses are one-sided
(positives only, r- = 0, like jax_privacy): under the theorem a wrong "excluded" guess counts the same as a
wrong "included" one, and DP-FedAvg's signal is in the included canaries' high scores.

A lower bound is evidence, not a guarantee: an audit whose bound sits far below the accountant's
epsilon says the attack was weak, not that the run is more private than accounted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """The p-value of "(epsilon, delta)-DP in each of `m` canaries" after `correct` right guesses of
    `guesses` (Steinke et al. 2023, Theorems 2 and 3)."""
    _check_counts(m, guesses, correct)
    if correct == 0:
        return 1.0
    q = float(scipy.special.expit(epsilon))
    beta = float(scipy.stats.binom.sf(correct - 1, guesses, q))  # P[W >= correct]
    if delta == 0:
        return beta
    i = np.arange(1, correct + 1)
    gaps = scipy.stats.binom.sf(correct - i - 1, guesses, q) - beta  # P[W >= correct - i] - P[W >= correct]
    alpha = max(float(np.max(gaps / i)), 0.0)
    return min(beta + alpha * delta * 2 * m, 1.0)


def pure_bound(guesses: np.ndarray, correct: np.ndarray, significance: float) -> np.ndarray:
    """The delta = 0 lower bound for each (guesses, correct) pair at once: logit of the one-sided
    Clopper-Pearson lower limit of the guesses' accuracy, floored at 0 (no bound)."""
    r, v = np.asarray(guesses, dtype=float), np.asarray(correct, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = scipy.stats.beta.ppf(significance, np.maximum(v, 1), np.maximum(r - v + 1, 1))
        eps = scipy.special.logit(accuracy)
    return np.where((v > 0) & np.isfinite(eps) & (eps > 0), eps, 0.0)


def epsilon_lower_bound(
    m: int, guesses: int, correct: int, *, confidence: float = 0.95, delta: float = 0.0
) -> float:
    """The largest epsilon whose (epsilon, delta) claim `correct` right guesses of `guesses` refute at
    `confidence`; 0 when they refute none."""
    _check_counts(m, guesses, correct)
    return _bound(m, guesses, correct, _significance(confidence), delta)


def _bound(m: int, guesses: int, correct: int, significance: float, delta: float) -> float:
    pure = float(pure_bound(np.array([guesses]), np.array([correct]), significance)[0])
    if pure <= 0 or delta == 0:
        return pure  # delta only raises the p-value: the pure bound is an upper limit of the approximate one

    def refuted(eps: float) -> float:  # > 0 while the claim at eps is refuted
        return significance - p_value(m, guesses, correct, eps, delta)

    if refuted(0.0) <= 0:
        return 0.0
    if refuted(pure) > 0:  # at most pure, up to rounding in the two computations
        return pure
    return float(scipy.optimize.brentq(refuted, 0.0, pure, xtol=1e-9))


@dataclass(frozen=True)
class OneRunAudit:
    """What `audit_scores` found: the bound and the guess that gave it."""

    epsilon: float  # the lower bound at `confidence` (0: the scores refute no epsilon)
    confidence: float
    delta: float
    canaries: int  # m: included and excluded
    included: int
    guesses: int  # r: the highest-scoring canaries guessed included
    correct: int  # v: how many of them were
    thresholds: int  # candidate thresholds the significance was divided among (Bonferroni)


def audit_scores(
    scores: np.ndarray, included: np.ndarray, *, confidence: float = 0.95, delta: float = 0.0
) -> OneRunAudit:
    """The one-run lower bound from each canary's score (higher: more likely included) and whether it
    was included: the best threshold over the candidates, at `confidence` after dividing the
    significance among them."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape or scores.size == 0:
        raise ValueError(f"scores {scores.shape} and inclusions {included.shape}: one each per canary")
    if not np.isfinite(scores).all():
        raise ValueError("a canary's score is not finite")
    m = scores.size
    guesses, correct = _hull_guesses(scores[included], scores[~included])
    significance = _significance(confidence) / guesses.size
    pure = pure_bound(guesses, correct, significance)
    best, pick = 0.0, -1
    for index in np.argsort(-pure, kind="stable"):
        if pure[index] <= best:
            break  # the approximate bound never exceeds the pure one
        r, v = int(guesses[index]), int(correct[index])
        eps = _bound(m, r, v, significance, delta)
        if eps > best:
            best, pick = eps, int(index)
    r, v = (int(guesses[pick]), int(correct[pick])) if pick >= 0 else (0, 0)
    return OneRunAudit(best, confidence, delta, m, int(included.sum()), r, v, int(guesses.size))


def _hull_guesses(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(guesses, correct) at each threshold on the upper concave hull of the (false negatives, true
    negatives) curve (jax_privacy's `_get_tn_fn_counts` and `_pareto_frontier`): a threshold inside a
    hull edge is weakly dominated by a mix of its ends, so it is not a candidate of its own."""
    thresholds = np.concatenate((np.union1d(in_scores, out_scores), [np.inf]))
    fn = np.searchsorted(np.sort(in_scores), thresholds, side="left")
    tn = np.searchsorted(np.sort(out_scores), thresholds, side="left")
    points = np.stack([fn, tn], axis=1).astype(float)
    keep = np.arange(len(points))
    while len(keep) > 2:
        diff = np.diff(points[keep], axis=0)
        cross = diff[:-1, 1] * diff[1:, 0] - diff[1:, 1] * diff[:-1, 0]
        dominated = cross <= 0
        if not dominated.any():
            break
        keep = keep[np.r_[True, ~dominated, True]]
    tp = in_scores.size - fn[keep]
    fp = out_scores.size - tn[keep]
    return tp + fp, tp


def _significance(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return 1.0 - confidence


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({m})")
