"""The Skellam mechanism's Renyi DP, and a `dp_accounting` accountant that composes it.

dp_accounting (0.6) has no Skellam event and its `RdpAccountant` takes no custom RDP curve, so this module
adds the two pieces through the library's own extension points: `SkellamDpEvent` (a `DpEvent`) and
`SkellamRdpAccountant` (a `PrivacyAccountant`). Events nest as usual (`SelfComposedDpEvent`,
`ComposedDpEvent`, `PoissonSampledDpEvent`, `SampledWithoutReplacementDpEvent`), and epsilon comes from
dp_accounting's own RDP-to-(epsilon, delta) conversion (`rdp_privacy_accountant.compute_epsilon`).

The curve (Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning", Theorem 3.5, the multi-dimensional mechanism with L1 and L2 sensitivities): integer vectors
whose neighbouring difference has norms at most `l1` and `l2`, plus i.i.d. symmetric Skellam noise of
variance `V` per coordinate, satisfy (a, eps(a))-RDP with

    eps(a) = a * l2^2 / (2V) + min(((2a - 1) * l2^2 + 6 * l1) / (4V^2), 3 * l1 / (2V)).

The first term is the Gaussian mechanism's RDP at the same variance; the second vanishes as V grows, so
the accounting tends to the Gaussian one (tested). Sampling uses general amplification bounds, valid for
any mechanism and evaluated at integer orders only: Poisson sampling (add/remove neighbours) by Zhu and
Wang 2019 (Theorem 6, the general upper bound), sampling without replacement (replace-one neighbours) by
Wang, Balle and Kasiviswanathan 2019 (Theorem 9, with eps(inf) = inf). Both are looser than
dp_accounting's Gaussian-specific computations, so Skellam's epsilon sits a little above the Gaussian one
at equal variance even where the noise is large; each is capped by the unsampled curve.

The sensitivities are those of the integer vectors the clients actually send (see `distributed.py`):
scaling by the quantization step and stochastic rounding inflate the L2 bound to C/step + sqrt(d), and an
integer vector's L1 norm is at most min(l2^2, sqrt(d) * l2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attr
import numpy as np
from dp_accounting import dp_event, privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

NeighborRel = privacy_accountant.NeighboringRelation

# Integer orders only: the general amplification bounds are stated for integer orders.
SKELLAM_ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512)

RdpCurve = Callable[[np.ndarray], np.ndarray]  # integer orders -> RDP at each


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SkellamDpEvent(dp_event.DpEvent):
    """Symmetric Skellam noise of `variance` per coordinate on an integer vector query whose neighbouring
    difference has L2 norm at most `l2_sensitivity` and L1 norm at most `l1_sensitivity`."""

    variance: float
    l2_sensitivity: float
    l1_sensitivity: float


def l1_sensitivity_bound(l2_sensitivity: float, dim: int) -> float:
    """An integer vector's L1 norm from its L2 bound: |x_i| >= 1 where nonzero, and Cauchy-Schwarz."""
    return min(l2_sensitivity**2, math.sqrt(dim) * l2_sensitivity)


def skellam_rdp(orders: Sequence[float] | np.ndarray, event: SkellamDpEvent) -> np.ndarray:
    """Agarwal et al. 2021, Theorem 3.5: the unsampled RDP of one Skellam event at each order."""
    a = np.asarray(orders, dtype=np.float64)
    v, l2, l1 = event.variance, event.l2_sensitivity, event.l1_sensitivity
    if not (v > 0 and math.isfinite(v)):
        return np.full_like(a, np.inf)
    gaussian_part = a * l2**2 / (2 * v)
    return gaussian_part + np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * v**2), 3 * l1 / (2 * v))


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def poisson_subsampled_rdp(orders: Sequence[int], q: float, curve: RdpCurve) -> np.ndarray:
    """Zhu and Wang 2019, Theorem 6: RDP of a mechanism run on a Poisson sample with probability q."""
    eps = curve(np.asarray(orders, dtype=np.float64))
    if q >= 1:
        return eps
    if q <= 0:
        return np.zeros_like(eps)
    out = np.empty_like(eps)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    for i, a in enumerate(int(o) for o in orders):
        ls = np.arange(2, a + 1, dtype=np.float64)
        eps_l = curve(ls)
        terms = _log_comb(a, ls) + ls * log_q + (a - ls) * log_1mq + (ls - 1) * eps_l
        terms[1:] += math.log(3)  # l >= 3 carry a factor 3; l = 2 does not
        head = (a - 1) * log_1mq + math.log1p((a - 1) * q)
        bound = special.logsumexp(np.concatenate(([head], terms))) / (a - 1)
        out[i] = min(bound, eps[i])
    return out


def without_replacement_rdp(orders: Sequence[int], q: float, curve: RdpCurve) -> np.ndarray:
    """Wang, Balle and Kasiviswanathan 2019, Theorem 9 (eps(inf) = inf): RDP of a mechanism run on a
    uniform subsample of a fraction q, for replace-one neighbours (`curve` under replace-one too)."""
    eps = curve(np.asarray(orders, dtype=np.float64))
    if q >= 1:
        return eps
    if q <= 0:
        return np.zeros_like(eps)
    out = np.empty_like(eps)
    log_q = math.log(q)
    eps2 = float(curve(np.array([2.0]))[0])
    # min(4 (e^eps2 - 1), 2 e^eps2), in logs
    log_second = min(math.log(4) + eps2 + math.log(-math.expm1(-eps2)), math.log(2) + eps2)
    for i, a in enumerate(int(o) for o in orders):
        ls = np.arange(3, a + 1, dtype=np.float64)
        terms = math.log(2) + _log_comb(a, ls) + ls * log_q + (ls - 1) * curve(ls)
        second = float(_log_comb(a, np.array([2.0]))[0]) + 2 * log_q + log_second
        bound = special.logsumexp(np.concatenate(([0.0, second], terms))) / (a - 1)
        out[i] = min(bound, eps[i])
    return out


class SkellamRdpAccountant(privacy_accountant.PrivacyAccountant):
    """RDP accounting of `SkellamDpEvent`s, alone or Poisson-sampled or sampled without replacement.

    The neighbouring relation is the caller's: ADD_OR_REMOVE_ONE for Poisson sampling (and no sampling),
    REPLACE_ONE for sampling without replacement, where the event's sensitivities must be the replace-one
    ones (twice the add/remove ones).
    """

    def __init__(
        self,
        orders: Sequence[int] = SKELLAM_ORDERS,
        neighboring_relation: NeighborRel = NeighborRel.ADD_OR_REMOVE_ONE,
    ) -> None:
        super().__init__(neighboring_relation)
        if any(int(o) != o or o < 2 for o in orders):
            raise ValueError("Skellam accounting needs integer RDP orders of at least 2")
        self._orders = np.array([int(o) for o in orders])
        self._rdp = np.zeros(len(self._orders), dtype=np.float64)

    @property
    def orders(self) -> np.ndarray:
        return self._orders.copy()

    @property
    def rdp(self) -> np.ndarray:
        return self._rdp.copy()

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> privacy_accountant.PrivacyAccountant.CompositionErrorDetails | None:
        def error(message: str) -> privacy_accountant.PrivacyAccountant.CompositionErrorDetails:
            return self.CompositionErrorDetails(invalid_event=event, error_message=message)

        rel = self.neighboring_relation
        if isinstance(event, dp_event.NoOpDpEvent):
            return None
        if isinstance(event, dp_event.NonPrivateDpEvent):
            if do_compose:
                self._rdp += np.inf
            return None
        if isinstance(event, dp_event.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_event.ComposedDpEvent):
            for inner in event.events:
                failed = self._maybe_compose(inner, count, do_compose)
                if failed is not None:
                    return failed
            return None
        if isinstance(event, SkellamDpEvent):
            if do_compose:
                self._rdp += count * skellam_rdp(self._orders, event)
            return None
        if isinstance(event, dp_event.PoissonSampledDpEvent):
            if rel is not NeighborRel.ADD_OR_REMOVE_ONE:
                return error(f"Poisson sampling is accounted for ADD_OR_REMOVE_ONE, not {rel}")
            if not isinstance(event.event, SkellamDpEvent):
                return error("only a SkellamDpEvent may be Poisson-sampled here")
            if do_compose:
                inner = event.event
                self._rdp += count * poisson_subsampled_rdp(
                    self._orders, event.sampling_probability, lambda a: skellam_rdp(a, inner)
                )
            return None
        if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
            if rel is not NeighborRel.REPLACE_ONE:
                return error(f"sampling without replacement is accounted for REPLACE_ONE, not {rel}")
            if not isinstance(event.event, SkellamDpEvent):
                return error("only a SkellamDpEvent may be sampled without replacement here")
            if do_compose:
                inner = event.event
                q = event.sample_size / event.source_dataset_size
                self._rdp += count * without_replacement_rdp(self._orders, q, lambda a: skellam_rdp(a, inner))
            return None
        return error("unsupported event for Skellam accounting")

    def get_epsilon(self, target_delta: float) -> float:
        return float(rdp_privacy_accountant.compute_epsilon(self._orders, self._rdp, target_delta)[0])

    def get_delta(self, target_epsilon: float) -> float:
        return float(rdp_privacy_accountant.compute_delta(self._orders, self._rdp, target_epsilon)[0])
