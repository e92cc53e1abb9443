"""Privacy accounting with Google's dp-accounting: epsilon spent so far, calibration, and the budget stop.

An `Accountant` records what each round released, as (mechanism, rounds) pairs, and asks dp_accounting for
epsilon at a delta by composing them from scratch (so a checkpoint is just that JSON-able history, and a
resumed run reports exactly the epsilon an uninterrupted one would). Two mechanisms:

- `GaussianRound(noise_multiplier)`: the Gaussian noise std on the sum of clipped deltas is
  `noise_multiplier * clip_l2_norm` (with adaptive clipping, the total multiplier of Andrew et al.: the
  deltas get more, the clipped count the rest). Accounted by `RdpAccountant` or `PLDAccountant`.
- `SkellamRound(variance, l2_sensitivity, dim)`: distributed Skellam noise in secure aggregation's integer
  domain (`skellam.py`). RDP only: dp_accounting has no PLD for it.

Sampling is what the simulation actually does, and each choice fixes a neighbouring relation:

- `poisson`: each client joins a round independently with probability q = cohort / population;
  add/remove-one neighbours (`PoissonSampledDpEvent`).
- `fixed`: exactly `cohort` of `population` clients, uniformly without replacement (fedtune's
  `sample_clients`); replace-one neighbours, so one client changes the sum by up to 2C and the Gaussian is
  accounted with noise multiplier z / 2 (`SampledWithoutReplacementDpEvent` under REPLACE_ONE, Wang, Balle
  and Kasiviswanathan 2019). dp_accounting's PLD accountant has no sampling without replacement: "pld" with
  "fixed" is refused, with that reason.
- `none`: every round may include the client and nothing hides whether it did (the guarantee against a
  server that knows the cohort): no amplification, with the neighbouring relation of the sampling it
  stands for (`Sampling.without_amplification`: replace-one for `fixed`, else add/remove).

Amplification by sampling assumes the adversary does not learn who was sampled. fedtune logs `client_ids`
per round and seeds sampling from `run.seed`, which the run directory publishes; report
`epsilon_known_cohort` (no amplification) next to `epsilon` unless the cohort is drawn from OS entropy and
kept private.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting import dp_event, mechanism_calibration, privacy_accountant
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedtune.privacy.settings import check_accountable
from fedtune.privacy.skellam import SkellamDpEvent, SkellamRdpAccountant, l1_sensitivity_bound

AccountantKind = Literal["rdp", "pld"]
SamplingKind = Literal["poisson", "fixed", "none"]
NeighborRel = privacy_accountant.NeighboringRelation


@dataclass(frozen=True)
class Sampling:
    """How a round's cohort is drawn from the population."""

    kind: SamplingKind
    population: int
    cohort: int  # for poisson: the expected cohort, q * population
    replace_one: bool = False  # for none: keep the replace-one relation of the fixed sampling it stands for

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "fixed", "none"):
            raise ValueError(f"sampling must be poisson, fixed or none, got {self.kind!r}")
        if not 1 <= self.cohort <= self.population:
            raise ValueError(f"a cohort of {self.cohort} out of a population of {self.population}")

    @property
    def probability(self) -> float:
        """The chance a given client is in a round."""
        return 1.0 if self.kind == "none" else self.cohort / self.population

    @property
    def replaces(self) -> bool:
        """Whether neighbours replace one client (fixed cohorts) rather than add or remove one."""
        return self.kind == "fixed" or self.replace_one

    @property
    def neighbouring(self) -> NeighborRel:
        return NeighborRel.REPLACE_ONE if self.replaces else NeighborRel.ADD_OR_REMOVE_ONE

    def without_amplification(self) -> Sampling:
        """The same neighbouring relation, with no credit for sampling."""
        return Sampling("none", self.population, self.cohort, replace_one=self.replaces)


@dataclass(frozen=True)
class GaussianRound:
    """Gaussian noise of std `noise_multiplier * C` on a sum of deltas clipped to L2 norm C."""

    noise_multiplier: float


@dataclass(frozen=True)
class SkellamRound:
    """Skellam noise of total `variance` per coordinate on the sum of integer-encoded clipped deltas of
    dimension `dim`; `l2_sensitivity` is one client's integer L2 bound (add/remove)."""

    variance: float
    l2_sensitivity: float
    dim: int


Mechanism = GaussianRound | SkellamRound


def round_event(mechanism: Mechanism, sampling: Sampling) -> dp_event.DpEvent:
    """The dp_accounting event for one round of `mechanism` under `sampling`."""
    replace_one = sampling.replaces  # one client's change moves the sum twice as far
    if isinstance(mechanism, GaussianRound):
        z = mechanism.noise_multiplier
        inner: dp_event.DpEvent = dp_accounting.GaussianDpEvent(z / 2 if replace_one else z)
    else:
        l2 = mechanism.l2_sensitivity * (2 if replace_one else 1)
        inner = SkellamDpEvent(mechanism.variance, l2, l1_sensitivity_bound(l2, mechanism.dim))
    if sampling.kind == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sampling.probability, inner)
    if sampling.kind == "fixed":
        return dp_accounting.SampledWithoutReplacementDpEvent(sampling.population, sampling.cohort, inner)
    return inner


def check_supported(kind: AccountantKind, sampling: SamplingKind, mechanism: type[Mechanism]) -> None:
    """Refuse (ConfigError) the combinations dp_accounting cannot account, with the reason."""
    check_accountable(kind, sampling, "skellam" if mechanism is SkellamRound else "gaussian")


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting logs a warning per fractional RDP order it drops; those orders are excluded anyway."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fresh_accountant(
    kind: AccountantKind, sampling: Sampling, mechanism: type[Mechanism]
) -> privacy_accountant.PrivacyAccountant:
    """An empty dp_accounting accountant for this mechanism and sampling."""
    check_supported(kind, sampling.kind, mechanism)
    rel = sampling.neighbouring
    if mechanism is SkellamRound:
        return SkellamRdpAccountant(neighboring_relation=rel)
    if kind == "pld":
        return pld_privacy_accountant.PLDAccountant(neighboring_relation=rel)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=rel)


def bounds(sampling: Sampling) -> tuple[Sampling, ...]:
    """The samplings whose epsilon each holds for a run sampled by `sampling`: itself and, when it samples,
    the same neighbouring relation without amplification (neighbouring cohorts differ in one client).
    A run's epsilon is the least of them; the bound for sampling without replacement can come out looser
    than none at large cohort fractions, e.g. 48 of 66 clients."""
    if sampling.kind == "none":
        return (sampling,)
    return (sampling, sampling.without_amplification())


def _mechanism_type(history: Sequence[tuple[Mechanism, int]]) -> type[Mechanism]:
    kinds = {type(m) for m, _ in history}
    if len(kinds) > 1:
        raise ValueError("one accountant accounts one kind of mechanism (Gaussian or Skellam)")
    return kinds.pop() if kinds else GaussianRound


def epsilon_of(
    history: Sequence[tuple[Mechanism, int]], delta: float, kind: AccountantKind, sampling: Sampling
) -> float:
    """Epsilon at `delta` after each (mechanism, rounds) of `history`, composed by dp_accounting."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = [(m, n) for m, n in history if n > 0]
    if not history:
        return 0.0
    accountant = fresh_accountant(kind, sampling, _mechanism_type(history))
    events = [dp_accounting.SelfComposedDpEvent(round_event(m, sampling), n) for m, n in history]
    with _quiet_absl():
        accountant.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
        return float(accountant.get_epsilon(delta))


def _mechanism_to_json(mechanism: Mechanism) -> dict[str, Any]:
    if isinstance(mechanism, GaussianRound):
        return {"mechanism": "gaussian", "noise_multiplier": mechanism.noise_multiplier}
    return {
        "mechanism": "skellam",
        "variance": mechanism.variance,
        "l2_sensitivity": mechanism.l2_sensitivity,
        "dim": mechanism.dim,
    }


def _mechanism_from_json(data: dict[str, Any]) -> Mechanism:
    if data["mechanism"] == "gaussian":
        return GaussianRound(float(data["noise_multiplier"]))
    if data["mechanism"] == "skellam":
        return SkellamRound(float(data["variance"]), float(data["l2_sensitivity"]), int(data["dim"]))
    raise ValueError(f"unknown mechanism {data['mechanism']!r} in an accountant state")


class Accountant:
    """Epsilon spent so far by a run: `step` after each round, `epsilon(delta)` for the metrics row,
    `would_exceed` before a round so the run stops before the budget is spent, `state_dict` to checkpoint."""

    STATE_VERSION = 1

    def __init__(self, kind: AccountantKind, sampling: Sampling) -> None:
        check_supported(kind, sampling.kind, GaussianRound)  # Skellam is checked at its first step
        self.kind: AccountantKind = kind
        self.sampling = sampling
        self._history: list[tuple[Mechanism, int]] = []
        self._cache: dict[tuple[Any, ...], float] = {}

    @property
    def rounds(self) -> int:
        return sum(n for _, n in self._history)

    @property
    def history(self) -> tuple[tuple[Mechanism, int], ...]:
        return tuple(self._history)

    def step(self, mechanism: Mechanism, rounds: int = 1) -> None:
        """Record `rounds` more rounds that released `mechanism`'s output."""
        if rounds < 0:
            raise ValueError(f"rounds must be non-negative, got {rounds}")
        check_supported(self.kind, self.sampling.kind, type(mechanism))
        if self._history and type(self._history[-1][0]) is not type(mechanism):
            raise ValueError("one accountant accounts one kind of mechanism (Gaussian or Skellam)")
        if self._history and self._history[-1][0] == mechanism:
            self._history[-1] = (mechanism, self._history[-1][1] + rounds)
        elif rounds:
            self._history.append((mechanism, rounds))

    def epsilon(self, delta: float) -> float:
        """Epsilon at `delta` spent so far: the least of the `bounds` that hold for the sampling."""
        return self._epsilon_with(None, 0, delta, self.sampling)

    def epsilon_known_cohort(self, delta: float) -> float:
        """Epsilon without amplification by sampling, same neighbouring relation: what holds against whoever
        knows each round's cohort (the server, a reader of metrics.jsonl's `client_ids`), for a client that
        took part in every round (an upper bound for the others)."""
        return self._epsilon_with(None, 0, delta, self.sampling.without_amplification())

    def epsilon_after(self, mechanism: Mechanism, delta: float, rounds: int = 1) -> float:
        """Epsilon at `delta` if `rounds` more rounds of `mechanism` ran."""
        return self._epsilon_with(mechanism, rounds, delta, self.sampling)

    def would_exceed(
        self, mechanism: Mechanism, target_epsilon: float, delta: float, rounds: int = 1
    ) -> bool:
        """True when `rounds` more rounds of `mechanism` would spend more than `target_epsilon`."""
        return self.epsilon_after(mechanism, delta, rounds) > target_epsilon

    def _epsilon_with(self, extra: Mechanism | None, rounds: int, delta: float, sampling: Sampling) -> float:
        history = list(self._history)
        if extra is not None and rounds:
            if history and history[-1][0] == extra:  # merged as `step` would: one cache entry per state
                history[-1] = (extra, history[-1][1] + rounds)
            else:
                history.append((extra, rounds))
        key = (tuple(history), delta, sampling)
        if key not in self._cache:
            self._cache[key] = min(epsilon_of(history, delta, self.kind, s) for s in bounds(sampling))
        return self._cache[key]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON: the accountant, the sampling and each (mechanism, rounds) run so far."""
        return {
            "version": self.STATE_VERSION,
            "accountant": self.kind,
            "sampling": {
                "kind": self.sampling.kind,
                "population": self.sampling.population,
                "cohort": self.sampling.cohort,
                "replace_one": self.sampling.replace_one,
            },
            "history": [{**_mechanism_to_json(m), "rounds": n} for m, n in self._history],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Accountant:
        if state.get("version") != cls.STATE_VERSION:
            raise ValueError(
                f"accountant state version {state.get('version')!r}; expected {cls.STATE_VERSION}"
            )
        s = state["sampling"]
        sampling = Sampling(s["kind"], int(s["population"]), int(s["cohort"]), bool(s.get("replace_one")))
        accountant = cls(state["accountant"], sampling)
        for entry in state["history"]:
            accountant.step(_mechanism_from_json(entry), int(entry["rounds"]))
        return accountant


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    kind: AccountantKind = "rdp",
    mechanism_for: Callable[[float], Mechanism] = GaussianRound,
) -> float:
    """The smallest noise multiplier z (within 1e-4) whose `rounds` rounds spend at most
    `target_epsilon` at `delta` by the bound `Accountant.epsilon` reports (the least of `bounds`), by
    `dp_accounting.calibrate_dp_mechanism`. `mechanism_for(z)` builds a round's mechanism from z: the
    Gaussian by default, the distributed Skellam with its integer domain."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    check_supported(kind, sampling.kind, type(mechanism_for(1.0)))
    # epsilon falls as z grows: the least z meeting the target under either bound meets it under their min
    return min(
        _calibrated_under(target_epsilon, delta, rounds, s, kind, mechanism_for) for s in bounds(sampling)
    )


def _calibrated_under(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    kind: AccountantKind,
    mechanism_for: Callable[[float], Mechanism],
) -> float:
    mechanism = type(mechanism_for(1.0))

    def event(z: float) -> dp_event.DpEvent:
        if z <= 0:
            return dp_accounting.NonPrivateDpEvent()
        return dp_accounting.SelfComposedDpEvent(round_event(mechanism_for(z), sampling), rounds)

    def fresh() -> privacy_accountant.PrivacyAccountant:
        return fresh_accountant(kind, sampling, mechanism)

    with _quiet_absl():
        z = mechanism_calibration.calibrate_dp_mechanism(
            fresh,
            event,
            target_epsilon,
            delta,
            bracket_interval=mechanism_calibration.LowerEndpointAndGuess(0.0, 1.0),
            tol=1e-4,
        )
    return float(z)


def rounds_within_budget(
    mechanism: Mechanism,
    target_epsilon: float,
    delta: float,
    sampling: Sampling,
    kind: AccountantKind = "rdp",
    max_rounds: int = 10_000,
) -> int:
    """The most rounds of `mechanism` whose epsilon at `delta` (the least of `bounds`) stays within
    `target_epsilon` (0 if none)."""
    return max(_rounds_under(mechanism, target_epsilon, delta, s, kind, max_rounds) for s in bounds(sampling))


def _rounds_under(
    mechanism: Mechanism,
    target_epsilon: float,
    delta: float,
    sampling: Sampling,
    kind: AccountantKind,
    max_rounds: int,
) -> int:
    if epsilon_of([(mechanism, 1)], delta, kind, sampling) > target_epsilon:
        return 0
    lo, hi = 1, max_rounds  # epsilon is non-decreasing in rounds: bisect for the last one within budget
    if epsilon_of([(mechanism, hi)], delta, kind, sampling) <= target_epsilon:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_of([(mechanism, mid)], delta, kind, sampling) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo
