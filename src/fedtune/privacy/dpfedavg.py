"""One run's client-level DP, in the order a round needs it: budget check, noise on the sum, account, adapt C.

`ClientLevelDp` composes the pure parts (`noise`, `adaptive`, `accountant`, `distributed`) behind the few
calls the round engine makes; clipping happens on each client (`round.encode`) and again on the server
for updates it sees in the clear:

    each round:   if not dp.round_fits_budget(fewest): stop, before sampling
                  central:      total = dp.add_noise(sum of clipped deltas)     # the server's noise
                  distributed:  total = the decoded sum, every client's Skellam share already in it
                  mean = dp.mean(total)                                          # public denominator
                  metrics = dp.end_round(unclipped=..., reported=..., contributors=...)

The mean divides by the public (expected) cohort size, never by how many clients were counted, so a
refused or dropped client changes no denominator. `state_dict` (accountant history and current C) goes
into a checkpoint; `from_state_dict` resumes with the same epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.privacy.accountant import Accountant
from fedtune.privacy.adaptive import ClipState, next_clip, noised_unclipped_fraction
from fedtune.privacy.noise import gaussian
from fedtune.privacy.plan import PrivacyPlan


@dataclass(frozen=True)
class PrivacyMetrics:
    """A round's privacy figures: the budget spent so far and what the round's noise and clip were."""

    epsilon: float
    epsilon_known_cohort: float  # against someone who knows who took part: no amplification
    clip_l2_norm: float
    noise_std: float | None  # on the real-valued sum; None before any round
    unclipped_fraction: float | None  # adaptive clipping's noised estimate


class ClientLevelDp:
    """DP-FedAvg's per-run state: the accountant, the current clip norm, and the noise generator."""

    def __init__(
        self,
        plan: PrivacyPlan,
        generator: torch.Generator,
        *,
        accountant: Accountant | None = None,
        clip_state: ClipState | None = None,
    ) -> None:
        """`generator` (central noise, clipped-count noise) must be seeded from the OS
        (`noise.os_entropy_generator`) outside tests, never from the run seed."""
        self.plan = plan
        self.generator = generator
        self.accountant = accountant or Accountant(plan.accountant, plan.sampling)
        self.clip_state = clip_state or ClipState(plan.clip_l2_norm)

    @property
    def clip_l2_norm(self) -> float:
        return self.clip_state.clip_l2_norm

    @property
    def client_clip_l2_norm(self) -> float:
        """The norm clients clip to: C, less the quantization margin under secure aggregation."""
        return self.clip_l2_norm - self.plan.clip_margin

    def round_fits_budget(self, fewest_contributors: int | None = None) -> bool:
        """False when one more round could spend more than the target epsilon (no target: always True).

        Distributed noise: pass the fewest shares a released sum can hold (secure aggregation's threshold),
        so that a round with dropouts, which has less noise, cannot overspend either."""
        if self.plan.target_epsilon is None:
            return True
        worst = self.plan.mechanism(fewest_contributors)
        return not self.accountant.would_exceed(worst, self.plan.target_epsilon, self.plan.delta)

    def add_noise(self, total: torch.Tensor) -> torch.Tensor:
        """Central mode: the sum of clipped deltas + N(0, (z_delta * C)^2) per coordinate."""
        std = self.plan.delta_noise_multiplier * self.clip_l2_norm
        return total + gaussian(total.shape, std, self.generator).to(total.dtype)

    def noise_std(self, contributors: int | None = None) -> float:
        if self.plan.distributed is not None:
            return self.plan.distributed.real_std(contributors or self.plan.distributed.min_contributors)
        return self.plan.delta_noise_multiplier * self.clip_l2_norm

    def end_round(
        self, *, unclipped: int = 0, reported: int = 0, contributors: int | None = None
    ) -> PrivacyMetrics:
        """Account the round that released a noised sum, move C (adaptive), and return its figures.
        `contributors`: distributed mode, the shares in the sum (its weight word)."""
        clip, std = self.clip_l2_norm, self.noise_std(contributors)
        self.accountant.step(self.plan.mechanism(contributors))
        fraction = None
        if self.plan.adaptive_clipping:
            assert self.plan.clipped_count_stddev is not None
            fraction = noised_unclipped_fraction(
                unclipped, reported, self.plan.denominator, self.plan.clipped_count_stddev, self.generator
            )
            moved = next_clip(self.clip_state, fraction, self.plan.target_quantile, self.plan.clip_lr)
            self.clip_state = ClipState(max(moved.clip_l2_norm, 2 * self.plan.clip_margin))
        return PrivacyMetrics(
            epsilon=self.accountant.epsilon(self.plan.delta),
            epsilon_known_cohort=self.accountant.epsilon_known_cohort(self.plan.delta),
            clip_l2_norm=clip,
            noise_std=std,
            unclipped_fraction=fraction,
        )

    def so_far(self) -> PrivacyMetrics:
        """The figures before any round (or after a resume): epsilon spent, the current clip."""
        return PrivacyMetrics(
            epsilon=self.accountant.epsilon(self.plan.delta) if self.accountant.rounds else 0.0,
            epsilon_known_cohort=(
                self.accountant.epsilon_known_cohort(self.plan.delta) if self.accountant.rounds else 0.0
            ),
            clip_l2_norm=self.clip_l2_norm,
            noise_std=None,
            unclipped_fraction=None,
        )

    def mean(self, noised_total: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A noised sum over the public denominator (the expected cohort), as float32."""
        total = torch.as_tensor(noised_total)
        return (total.to(torch.float64) / self.plan.denominator).to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clip_l2_norm": self.clip_l2_norm}

    @classmethod
    def from_state_dict(
        cls, plan: PrivacyPlan, state: dict[str, Any], generator: torch.Generator
    ) -> ClientLevelDp:
        return cls(
            plan,
            generator,
            accountant=Accountant.from_state_dict(state["accountant"]),
            clip_state=ClipState(float(state["clip_l2_norm"])),
        )
