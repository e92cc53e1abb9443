"""The `[privacy]` and `[dpsgd]` config sections, and which privacy settings dp_accounting can account.

The sections are pydantic models in fedtune's config style (frozen, unknown keys refused); `fedtune.config`
embeds them and checks the rules that span sections (`config.checks`). This module imports only pydantic:
dp_accounting (about a second to import) is loaded when a plan is resolved (`privacy.plan`), so
`fedtune config` stays fast.

`[privacy]` takes `noise_multiplier`, or `target_epsilon` (+ `delta`), or both:
- only `noise_multiplier`: every round runs; `epsilon` is reported, nothing stops the run;
- only `target_epsilon`: z is calibrated so that `federation.rounds` rounds spend at most it (written back
  into the resolved config), and the run stops before any round that would exceed it;
- both: z as given, and the run stops before the budget is exceeded.
`delta` defaults to 1 / population^1.1 (McMahan et al. 2018) and must stay below 1 / population, since
a mechanism that publishes one random client's data whole meets any delta >= 1 / population.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.errors import ConfigError
from fedtune.section import Section


class PrivacyConfig(Section):
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


class DpSgdConfig(Section):
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
