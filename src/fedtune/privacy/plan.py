"""What a DP run does, resolved once the population (and, under secure aggregation, the encoding and the
adapter size) is known: sampling, delta, the noise multiplier (calibrated to `target_epsilon` when not
given), adaptive clipping's split of the noise, distributed noise's integer plan, the quantization margin.

`plan_privacy` takes the `[privacy]` section and plain sizes, never the whole config; the rules that span
sections are checked before it is called (`fedtune.config.checks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedtune.errors import ConfigError
from fedtune.privacy.accountant import (
    GaussianRound,
    Mechanism,
    Sampling,
    calibrate_noise_multiplier,
)
from fedtune.privacy.adaptive import default_clipped_count_stddev, delta_noise_multiplier
from fedtune.privacy.distributed import DistributedNoise
from fedtune.privacy.settings import PrivacyConfig, default_delta


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP run does, resolved once the population (and, for distributed noise, the encoding and the
    adapter size) is known."""

    mode: Literal["central", "distributed"]
    sampling: Sampling
    accountant: Literal["rdp", "pld"]
    delta: float
    noise_multiplier: float  # the total z the accountant accounts
    target_epsilon: float | None  # the budget; None: no stop
    clip_l2_norm: float
    adaptive_clipping: bool
    target_quantile: float
    clip_lr: float
    clipped_count_stddev: float | None  # with adaptive clipping
    delta_noise_multiplier: float  # z for the deltas: z, or more with adaptive clipping
    distributed: DistributedNoise | None = None
    # central noise on a secure sum: quantization may lengthen a clipped delta by up to sqrt(d) * step, so
    # deltas are clipped to C - clip_margin and the decoded sum keeps sensitivity C
    clip_margin: float = 0.0

    @property
    def denominator(self) -> float:
        """The public divisor that turns the noised sum into a mean: the (expected) cohort."""
        return float(self.sampling.cohort)

    def mechanism(self, contributors: int | None = None) -> Mechanism:
        """What one round releases, for the accountant: `contributors` matters for distributed noise."""
        if self.distributed is None:
            return GaussianRound(self.noise_multiplier)
        return self.distributed.mechanism(contributors or self.distributed.min_contributors)

    def resolved(self, section: PrivacyConfig) -> PrivacyConfig:
        """`section` with the resolved noise multiplier and delta, for the run's config.toml."""
        return section.model_copy(update={"noise_multiplier": self.noise_multiplier, "delta": self.delta})


def plan_privacy(
    section: PrivacyConfig,
    *,
    population: int,
    cohort: int,
    rounds: int,
    adapter_numel: int | None = None,
    encoding_step: float | None = None,
) -> PrivacyPlan | None:
    """Resolve `[privacy]` for a run: sampling, delta, z (calibrated to `target_epsilon` over `rounds`).

    Under secure aggregation (either mode) pass the adapter size and the encoding's step
    (`FixedPoint.step`, with max_weight 1). Returns None when privacy is off."""
    p = section
    if p.mode == "off":
        return None
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError(
            f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier or privacy.target_epsilon (or both)"
        )
    sampling = Sampling(p.sampling, population, cohort)
    delta = p.delta if p.delta is not None else default_delta(population)
    secure = encoding_step is not None
    if secure and adapter_numel is None:
        raise ValueError("with secure aggregation, a privacy plan needs adapter_numel and encoding_step")
    if p.mode == "distributed" and not secure:
        raise ValueError("distributed noise needs secure aggregation's encoding step")

    def distributed_noise(z: float) -> DistributedNoise:
        assert adapter_numel is not None and encoding_step is not None
        return DistributedNoise(p.clip_l2_norm, z, encoding_step, adapter_numel, min_contributors=cohort)

    margin = 0.0
    if secure and p.mode == "central":
        assert adapter_numel is not None and encoding_step is not None
        margin = math.sqrt(adapter_numel) * encoding_step
        if margin >= p.clip_l2_norm / 2:
            raise ConfigError(
                f"privacy.clip_l2_norm = {p.clip_l2_norm:g} is too small for secure aggregation's "
                f"quantization: rounding can lengthen a delta by sqrt(d) x step = {margin:.3g}; raise "
                "secure_aggregation.bits or privacy.clip_l2_norm"
            )

    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None  # refused above
        if p.mode == "distributed":
            z = calibrate_noise_multiplier(
                p.target_epsilon,
                delta,
                rounds,
                sampling,
                p.accountant,
                mechanism_for=lambda x: distributed_noise(x).mechanism(cohort),
            )
        else:
            z = calibrate_noise_multiplier(p.target_epsilon, delta, rounds, sampling, p.accountant)
    count_stddev = None
    z_delta = z
    if p.adaptive_clipping:
        count_stddev = p.clipped_count_stddev or default_clipped_count_stddev(cohort)
        z_delta = delta_noise_multiplier(z, count_stddev)
    if not math.isfinite(z_delta):
        raise ConfigError(f"privacy.noise_multiplier resolved to {z_delta}; check privacy.target_epsilon")
    return PrivacyPlan(
        mode=p.mode,
        sampling=sampling,
        accountant=p.accountant,
        delta=delta,
        noise_multiplier=z,
        target_epsilon=p.target_epsilon,
        clip_l2_norm=p.clip_l2_norm,
        adaptive_clipping=p.adaptive_clipping,
        target_quantile=p.target_quantile,
        clip_lr=p.clip_lr,
        clipped_count_stddev=count_stddev,
        delta_noise_multiplier=z_delta,
        distributed=distributed_noise(z) if p.mode == "distributed" else None,
        clip_margin=margin,
    )
