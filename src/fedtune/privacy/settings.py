"""The `[privacy]` and `[dpsgd]` config sections, their checks, and the plan a run resolves from them.

The sections are pydantic models in fedtune's config style (frozen, unknown keys refused); `fedtune.config`
embeds them and calls `check_privacy` from its combination validator, and again with the real population
once the data is loaded. This module imports only pydantic at load: dp_accounting (about a second to import)
is loaded when a plan is resolved, so `fedtune config` stays fast.

`[privacy]` takes `noise_multiplier`, or `target_epsilon` (+ `delta`), or both:
- only `noise_multiplier`: every round runs; `epsilon` is reported, nothing stops the run;
- only `target_epsilon`: z is calibrated so that `federation.rounds` rounds spend at most it (written back
  into the resolved config), and the run stops before any round that would exceed it;
- both: z as given, and the run stops before the budget is exceeded.
`delta` defaults to 1 / population^1.1 (McMahan et al. 2018) and must stay below 1 / population, since
a mechanism that publishes one random client's data whole meets any delta >= 1 / population.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.privacy.accountant import Mechanism, Sampling
    from fedtune.privacy.distributed import DistributedNoise


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacyConfig(_Section):
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each delta, noise the sum, account the rounds."""

    mode: Literal["off", "central", "distributed"] = "off"  # who adds the noise: the server, or each client
    clip_l2_norm: float = Field(1.0, gt=0.0)  # C; the initial C with adaptive clipping
    adaptive_clipping: bool = False  # Andrew et al. 2021: C tracks a quantile of the update norms
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)  # the fraction of clients meant to fit under C
    clip_lr: float = Field(0.2, gt=0.0)  # geometric learning rate of C
    clipped_count_stddev: float | None = Field(None, gt=0.0)  # default: 0.05 x expected clients per round
    noise_multiplier: float | None = Field(None, gt=0.0)  # z: noise std = z * C on the sum of deltas
    target_epsilon: float | None = Field(None, gt=0.0)  # the budget over the whole run
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # default: 1 / population^1.1
    accountant: Literal["rdp", "pld"] = "rdp"
    sampling: Literal["fixed", "poisson"] = "fixed"  # fixed: clients_per_round exactly; poisson: each w.p. q


class DpSgdConfig(_Section):
    """Sample-level DP on every client: DP-SGD through Opacus (per-example clipping and noise)."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)  # per-example L2 clip
    delta: float = Field(1e-5, gt=0.0, lt=1.0)  # per record; keep it below 1 / (a client's examples)


def check_accountable(accountant: str, sampling: str, mechanism: Literal["gaussian", "skellam"]) -> None:
    """Refuse (ConfigError) what dp_accounting cannot account, with the reason."""
    if accountant not in ("rdp", "pld"):
        raise ConfigError(f"privacy.accountant = {accountant!r}; allowed: 'rdp', 'pld'")
    if accountant == "pld" and mechanism == "skellam":
        raise ConfigError(
            "privacy.accountant = 'pld' cannot account the distributed Skellam noise: dp_accounting has no "
            "privacy loss distribution for it, only its Renyi DP bound; use privacy.accountant = 'rdp'"
        )
    if accountant == "pld" and sampling == "fixed":
        raise ConfigError(
            "privacy.accountant = 'pld' cannot account privacy.sampling = 'fixed': dp_accounting's PLD "
            "accountant has no sampling without replacement; use privacy.accountant = 'rdp' or "
            "privacy.sampling = 'poisson'"
        )


def default_delta(population: int) -> float:
    return 1.0 / population**1.1


def check_privacy(config: Config, population: int | None = None) -> None:
    """Refuse (ConfigError) privacy settings that cannot work, with the reason: at load, and again with the
    real population once the data is loaded."""
    p = config.privacy
    if config.dpsgd.enabled:
        _check_dpsgd(config)
    if p.mode == "off":
        return
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError(
            f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier or privacy.target_epsilon (or both)"
        )
    if config.server.rule != "fedavg":
        raise ConfigError(
            f"privacy.mode = {p.mode!r} bounds one client's effect on the SUM of deltas, and "
            f"server.rule = {config.server.rule!r} is not a sum; use server.rule = 'fedavg'"
        )
    check_accountable(p.accountant, p.sampling, "skellam" if p.mode == "distributed" else "gaussian")
    if p.mode == "distributed":
        if not config.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.mode = 'distributed' has each client add a share of the noise, which protects "
                "against the server only if it sees nothing but the sum; set secure_aggregation.enabled = "
                "true, or use privacy.mode = 'central'"
            )
        if p.adaptive_clipping:
            raise ConfigError(
                "privacy.adaptive_clipping needs a noised count of unclipped clients, which under "
                "privacy.mode = 'distributed' would need its own secure sum and discrete noise (not "
                "implemented); use privacy.mode = 'central' or privacy.adaptive_clipping = false"
            )
    if p.adaptive_clipping and p.noise_multiplier is not None:
        stddev = p.clipped_count_stddev
        if stddev is None:
            cohort = _cohort(config, population)
            stddev = None if cohort is None else 0.05 * cohort
        if stddev is not None and p.noise_multiplier >= 2 * stddev:
            raise ConfigError(
                f"privacy.adaptive_clipping with privacy.noise_multiplier = {p.noise_multiplier:g} needs "
                f"privacy.clipped_count_stddev above {p.noise_multiplier / 2:g} (it is {stddev:g}; the "
                "default is 0.05 x clients per round): the clipped count's noise must leave the deltas "
                "some budget (Andrew et al. 2021); raise it or lower the noise multiplier"
            )
    size = population if population is not None else config.federation.num_clients
    if isinstance(size, int) and p.delta is not None and p.delta >= 1 / size:
        raise ConfigError(
            f"privacy.delta = {p.delta:g} is not below 1 / population = 1/{size}: publishing one random "
            f"client's data whole would meet it; use a delta well below {1 / size:.3g} "
            "(default: 1 / population^1.1)"
        )


def _check_dpsgd(config: Config) -> None:
    """Refuse what DP-SGD cannot do: it works with LoRA on linear layers, not on embeddings (checked again on
    the built model by `dpsgd.check_dpsgd_model`, whatever the module names)."""
    embeddings = [m for m in config.lora.target_modules if m in ("embed_tokens", "wte", "word_embeddings")]
    if embeddings:
        raise ConfigError(
            f"dpsgd.enabled with lora.target_modules = {list(config.lora.target_modules)}: Opacus computes "
            f"per-example gradients for linear layers only, and {embeddings[0]!r} is an embedding whose LoRA "
            "tensors it never sees; drop it from lora.target_modules or set dpsgd.enabled = false"
        )
    limit = config.data.max_examples_per_client
    if limit != "all" and config.dpsgd.delta >= 1 / limit:
        raise ConfigError(
            f"dpsgd.delta = {config.dpsgd.delta:g} is not below 1 / data.max_examples_per_client = "
            f"1/{limit}: releasing one random record would meet it; lower dpsgd.delta"
        )


def _cohort(config: Config, population: int | None) -> int | None:
    fed = config.federation
    size = population if population is not None else fed.num_clients
    if size == "all":
        return None if fed.fraction_per_round is not None else fed.clients_per_round
    if fed.fraction_per_round is not None:
        return max(1, round(fed.fraction_per_round * size))
    return min(fed.clients_per_round, size)


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
        from fedtune.privacy.accountant import GaussianRound

        if self.distributed is None:
            return GaussianRound(self.noise_multiplier)
        return self.distributed.mechanism(contributors or self.distributed.min_contributors)

    def resolved(self, section: PrivacyConfig) -> PrivacyConfig:
        """`section` with the resolved noise multiplier and delta, for the run's config.toml."""
        return section.model_copy(update={"noise_multiplier": self.noise_multiplier, "delta": self.delta})


def plan_privacy(
    config: Config,
    population: int,
    cohort: int,
    *,
    adapter_numel: int | None = None,
    encoding_step: float | None = None,
) -> PrivacyPlan | None:
    """Resolve `[privacy]` for a run: sampling, delta, z (calibrated to `target_epsilon` when not given).

    With secure aggregation on (either mode) it needs the adapter size and the encoding's step
    (`FixedPoint.step`, with max_weight 1). Returns None when privacy is off."""
    from fedtune.privacy.accountant import Sampling, calibrate_noise_multiplier
    from fedtune.privacy.adaptive import default_clipped_count_stddev, delta_noise_multiplier
    from fedtune.privacy.distributed import DistributedNoise

    p = config.privacy
    if p.mode == "off":
        return None
    check_privacy(config, population)
    sampling = Sampling(p.sampling, population, cohort)
    delta = p.delta if p.delta is not None else default_delta(population)

    secure = config.secure_aggregation.enabled
    if secure and (adapter_numel is None or encoding_step is None):
        raise ValueError("with secure aggregation, a privacy plan needs adapter_numel and encoding_step")

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
        assert p.target_epsilon is not None  # check_privacy refused neither
        if p.mode == "distributed":
            z = calibrate_noise_multiplier(
                p.target_epsilon,
                delta,
                config.federation.rounds,
                sampling,
                p.accountant,
                mechanism_for=lambda x: distributed_noise(x).mechanism(cohort),
            )
        else:
            z = calibrate_noise_multiplier(
                p.target_epsilon, delta, config.federation.rounds, sampling, p.accountant
            )
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
