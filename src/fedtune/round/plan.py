"""What a run resolved before round 1, as plain values: the server's `RunPlan`, a client's `ParticipantSpec`.

Both are built from the config by `fedtune.config.plan` (the server's with the population and the adapter's
size, a site's from the config the server sends), so simulation and deployment read the same numbers:
one weight rule, one local workload, one encoding. Nothing here reads a config section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedtune.compress import CompressionSpec
from fedtune.layout import AdapterLayout
from fedtune.privacy.dpsgd import record_epsilon
from fedtune.privacy.noise import os_entropy_generator, os_entropy_rng
from fedtune.privacy.plan import PrivacyPlan
from fedtune.round.personal import PersonalSpec
from fedtune.round.scaffold import ControlSpec
from fedtune.secagg import FixedPoint, SecAggParams, default_threshold
from fedtune.secagg.graph import resolve_neighbours


@dataclass(frozen=True)
class Member:
    """A client's place in an exchange: `slot` in the round's list, `index` in the population (it names
    the client's seeds: the same in simulation and at its site), and its id."""

    slot: int
    index: int
    client_id: str


@dataclass(frozen=True)
class WeightRule:
    """How much a client's update counts in the round's weighted mean: its training examples, capped at
    `cap` (`data.max_examples_per_client`, the public bound secure aggregation's encoding is sized for);
    every client 1 under client-level DP (`unit`). The one rule, on the server and on the client."""

    cap: int | None = None
    unit: bool = False

    def of(self, num_examples: int) -> int:
        if self.unit:
            return 1
        return num_examples if self.cap is None else min(num_examples, self.cap)

    @property
    def bound(self) -> int | None:
        """The largest weight any client can have (None: no public bound)."""
        return 1 if self.unit else self.cap


@dataclass(frozen=True)
class LocalWork:
    """A client's local work per round: `steps` optimizer steps, or `epochs` passes over its data."""

    steps: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")


@dataclass(frozen=True)
class SecureSettings:
    """Secure aggregation's public settings; a round's `SecAggParams` follow from its cohort."""

    bits: int
    clip_range: float
    neighbours: int | Literal["auto", "all"]
    threshold: int | None  # None: a strict majority of each client's k + 1 share holders
    max_weight: int  # the largest weight a payload may carry (1 under client-level DP)

    def threshold_for(self, cohort: int) -> int:
        k = resolve_neighbours(self.neighbours, cohort)
        return default_threshold(k) if self.threshold is None else self.threshold

    def params(self, round_num: int, cohort: int, vector_size: int) -> SecAggParams:
        k = resolve_neighbours(self.neighbours, cohort)
        encoding = FixedPoint(self.bits, self.clip_range, self.max_weight, cohort)
        return SecAggParams(round_num, vector_size, self.threshold_for(cohort), k, encoding)


@dataclass(frozen=True)
class RunPlan:
    """The server's side of a run, resolved once the population and the adapter are known."""

    seed: int
    rounds: int
    population: tuple[str, ...]  # client ids, sorted: a client's index here names its seeds
    cohort: int  # clients per round (the expected cohort under Poisson sampling)
    selected: int  # clients selected per round: the cohort, or more with deploy.over_selection
    min_clients: int  # fewer updates fail the round
    eval_every: int
    eval_members: tuple[int, ...]  # population indices evaluated every eval round
    weights: WeightRule
    compression: CompressionSpec
    adapter_numel: int
    secure: SecureSettings | None = None
    privacy: PrivacyPlan | None = None
    dpsgd: bool = False
    reproducible_graph: bool = True  # SecAgg+ graph from the run seed (simulation), else from the OS
    normalize_steps: bool = False  # FedNova: updates arrive per local step; the mean is scaled back
    ranks: tuple[int, ...] | None = None  # heterogeneous ranks: each client's LoRA rank, by population index
    layout: AdapterLayout | None = None  # where each LoRA tensor sits in the adapter vector
    control: ControlSpec | None = None  # SCAFFOLD's control variates (server.control_variates); None: off
    personalize: bool = False  # the last evaluation also evaluates each client's personal adapter
    trainers: tuple[int, ...] | None = None  # population indices cohorts are drawn from (None: all);
    # `fedtune compare`'s centralized arm trains one pooled client and evaluates on the others
    split: bool = False  # personalize.method = "split": an update is the delta of the A values only

    @property
    def update_numel(self) -> int:
        """Values in one client's update: the adapter's, twice under SCAFFOLD (delta, then control),
        its A values only under split personalization."""
        if self.split:
            if self.layout is None:
                raise ValueError("split personalization needs the adapter's layout")
            return int(self.layout.a_mask.sum())
        return self.adapter_numel * (1 if self.control is None else 2)


@dataclass(frozen=True)
class DpSgdAccounting:
    """What a client needs to account its own DP-SGD: per-record epsilon after its steps so far."""

    batch_size: int
    noise_multiplier: float
    delta: float

    def epsilon(self, num_examples: int, steps: int) -> float:
        return record_epsilon(num_examples, self.batch_size, self.noise_multiplier, steps, self.delta)


@dataclass(frozen=True)
class ParticipantSpec:
    """A client's side of a run: the same in simulation and at a deployed site."""

    seed: int
    work: LocalWork
    compression: CompressionSpec
    weights: WeightRule
    eval_examples: int  # held-out examples per evaluation
    eval_batch_size: int
    dpsgd: DpSgdAccounting | None = None
    normalize_steps: bool = False  # FedNova: send the delta divided by the local steps it took
    rank: int | None = None  # heterogeneous ranks: train only the first `rank` LoRA components
    control: ControlSpec | None = None  # SCAFFOLD (server.control_variates); None: off
    personal: PersonalSpec | None = None  # [personalize] (None: method "none")

    @property
    def keeps_state(self) -> bool:
        """A client of this run carries state between rounds: SCAFFOLD's control, an error-feedback
        residual, its DP-SGD steps, or a personal adapter trained along the rounds."""
        along = self.personal is not None and self.personal.trains_along
        return (
            self.control is not None
            or self.compression.uses_error_feedback
            or self.dpsgd is not None
            or along
        )


@dataclass(frozen=True)
class DpRandomness:
    """The generators client-level DP draws from. Outside tests they come from the OS (`from_os`), never
    from the run seed: the guarantee rests on the noise and the cohort being unpredictable."""

    noise: torch.Generator  # the server's Gaussian noise and adaptive clipping's count noise
    shares: np.random.Generator  # distributed DP: the Skellam shares of in-process clients
    cohort: np.random.Generator  # who is sampled into each round

    @classmethod
    def from_os(cls) -> DpRandomness:
        return cls(os_entropy_generator(), os_entropy_rng(), os_entropy_rng())
