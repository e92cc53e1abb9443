"""One run's client-level DP, in the order a round needs it: budget check, clip, noise, account, adapt C.

`ClientLevelDp` composes the pure parts (`clip`, `noise`, `adaptive`, `accountant`, `distributed`) behind
the few calls the simulation (or a deployed server) makes:

    dp = ClientLevelDp(plan, os_entropy_generator(), os_entropy_rng())
    each round:   if not dp.round_fits_budget(): stop, before sampling
                  per client: clipped, fits = dp.clip(delta)    # NonFiniteUpdate -> refused, send zeros
                    central:     sum the clipped deltas with weight 1 (a refused client adds zeros)
                    distributed: payload = add_noise_to_payload(encode(clipped, 1, ...), dp.noise_share())
                  central:      mean = dp.noised_mean(total)       # the server adds the noise
                  distributed:  mean = dp.mean(decode_noised_sum(words, spec).total)
                  row |= dp.end_round(unclipped=..., reported=..., contributors=...)

The mean divides by the public (expected) cohort size, never by how many clients were counted, so a
refused or dropped client changes no denominator. `state_dict` (accountant history and current C) goes
into a checkpoint; `from_state_dict` resumes with the same epsilon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtune.privacy.accountant import Accountant
from fedtune.privacy.adaptive import ClipState, next_clip, noised_unclipped_fraction
from fedtune.privacy.clip import clip_l2
from fedtune.privacy.noise import gaussian
from fedtune.privacy.settings import PrivacyPlan

if TYPE_CHECKING:
    from fedtune.config import Config


class ClientLevelDp:
    """DP-FedAvg's per-run state: the accountant, the current clip norm, and the noise generators."""

    def __init__(
        self,
        plan: PrivacyPlan,
        generator: torch.Generator,
        rng: np.random.Generator | None = None,
        *,
        accountant: Accountant | None = None,
        clip_state: ClipState | None = None,
    ) -> None:
        """`generator` (central noise, clipped-count noise) and `rng` (distributed shares) must be seeded
        from the OS (`noise.os_entropy_generator`, `noise.os_entropy_rng`), never from the run seed."""
        if plan.mode == "distributed" and rng is None:
            raise ValueError("distributed noise needs a numpy generator for the clients' shares")
        self.plan = plan
        self.generator = generator
        self.rng = rng
        self.accountant = accountant or Accountant(plan.accountant, plan.sampling)
        self.clip_state = clip_state or ClipState(plan.clip_l2_norm)

    @property
    def clip_l2_norm(self) -> float:
        return self.clip_state.clip_l2_norm

    def round_fits_budget(self, fewest_contributors: int | None = None) -> bool:
        """False when one more round could spend more than the target epsilon (no target: always True).

        Distributed noise: pass the fewest shares a released sum can hold (secure aggregation's threshold),
        so that a round with dropouts, which has less noise, cannot overspend either."""
        if self.plan.target_epsilon is None:
            return True
        worst = self.plan.mechanism(fewest_contributors)
        return not self.accountant.would_exceed(worst, self.plan.target_epsilon, self.plan.delta)

    def clip(self, delta: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The delta clipped to the current C (less the quantization margin under secure aggregation), and
        whether it fit under C (adaptive clipping's bit). Raises `NonFiniteUpdate` for NaN/Inf: refuse the
        update and count it as a zero delta."""
        result = clip_l2(delta, self.clip_l2_norm - self.plan.clip_margin)
        return result.delta, not result.clipped

    def noise_share(self) -> np.ndarray:
        """Distributed mode: one client's integer Skellam share for its encoded payload."""
        assert self.plan.distributed is not None and self.rng is not None
        return self.plan.distributed.share(self.rng)

    def noised_mean(self, total: torch.Tensor) -> torch.Tensor:
        """Central mode: (sum of clipped deltas + N(0, (z_delta * C)^2)) / expected cohort."""
        std = self.plan.delta_noise_multiplier * self.clip_l2_norm
        return self.mean(total + gaussian(total.shape, std, self.generator))

    def mean(self, noised_total: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A noised sum over the public denominator (the expected cohort), as float32."""
        total = torch.as_tensor(noised_total)
        return (total.to(torch.float64) / self.plan.denominator).to(torch.float32)

    def end_round(
        self, *, unclipped: int = 0, reported: int = 0, contributors: int | None = None
    ) -> dict[str, Any]:
        """Account the round that released a noised sum, move C (adaptive), and return the metrics row's
        privacy entries. `contributors`: distributed mode, the shares in the sum (its weight word)."""
        metrics: dict[str, Any] = {"dp_clip_l2_norm": self.clip_l2_norm}
        if self.plan.distributed is not None:
            metrics["dp_noise_std"] = self.plan.distributed.real_std(
                contributors or self.plan.distributed.min_contributors
            )
        else:
            metrics["dp_noise_std"] = self.plan.delta_noise_multiplier * self.clip_l2_norm
        self.accountant.step(self.plan.mechanism(contributors))
        if self.plan.adaptive_clipping:
            assert self.plan.clipped_count_stddev is not None
            fraction = noised_unclipped_fraction(
                unclipped, reported, self.plan.denominator, self.plan.clipped_count_stddev, self.generator
            )
            moved = next_clip(self.clip_state, fraction, self.plan.target_quantile, self.plan.clip_lr)
            self.clip_state = ClipState(max(moved.clip_l2_norm, 2 * self.plan.clip_margin))
            metrics["dp_unclipped_fraction"] = fraction  # noised: released under the same guarantee
        metrics["epsilon"] = self.accountant.epsilon(self.plan.delta)
        metrics["epsilon_known_cohort"] = self.accountant.epsilon_known_cohort(self.plan.delta)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clip_l2_norm": self.clip_l2_norm}

    @classmethod
    def from_state_dict(
        cls,
        plan: PrivacyPlan,
        state: dict[str, Any],
        generator: torch.Generator,
        rng: np.random.Generator | None = None,
    ) -> ClientLevelDp:
        return cls(
            plan,
            generator,
            rng,
            accountant=Accountant.from_state_dict(state["accountant"]),
            clip_state=ClipState(float(state["clip_l2_norm"])),
        )


def resolve_client_dp(
    config: Config, population: int, cohort: int, adapter_numel: int, state: dict[str, Any] | None = None
) -> tuple[Config, ClientLevelDp | None]:
    """Resolve `[privacy]` once sizes are known: the config recording z and delta, and the run's DP state
    (resumed from a checkpoint's `state`). Noise generators are seeded from the OS, never the run seed."""
    from fedtune.config import check_privacy
    from fedtune.privacy.distributed import check_headroom
    from fedtune.privacy.noise import os_entropy_generator, os_entropy_rng
    from fedtune.privacy.settings import plan_privacy
    from fedtune.secagg import FixedPoint

    if config.privacy.mode == "off":
        return config, None
    check_privacy(config, population)
    spec = None
    if config.secure_aggregation.enabled:
        sa = config.secure_aggregation
        spec = FixedPoint(sa.bits, sa.clip_range, 1, cohort)
    plan = plan_privacy(
        config,
        population,
        cohort,
        adapter_numel=adapter_numel,
        encoding_step=None if spec is None else spec.step,
    )
    if plan is None:
        return config, None
    if spec is not None and plan.distributed is not None:
        check_headroom(cohort, spec, plan.distributed)
    resolved = config.model_copy(update={"privacy": plan.resolved(config.privacy)})
    if state is not None:
        return resolved, ClientLevelDp.from_state_dict(plan, state, os_entropy_generator(), os_entropy_rng())
    return resolved, ClientLevelDp(plan, os_entropy_generator(), os_entropy_rng())
