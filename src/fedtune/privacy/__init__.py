"""Differential privacy: client-level DP-FedAvg (central or distributed noise) and client-side DP-SGD.

Files follow a round: `clip` (L2 clipping, robust to huge values, refuses NaN/Inf), `adaptive` (the clip
norm tracks a quantile of update norms, Andrew et al. 2021), `noise` (central Gaussian, per-client Skellam,
OS-entropy generators), `distributed` (Skellam shares in secure aggregation's integer domain and the centred
decode), `skellam` (its Renyi DP and a dp_accounting accountant for it), `accountant` (epsilon so far,
calibration, the budget stop, checkpoints), `cohort` (Poisson sampling), `plan` (what a DP run does, resolved
from the section and sizes), `dpfedavg` (the per-run state a round calls), `dpsgd` (sample-level DP-SGD
accounting; the trainer itself is `fedtune.train.dpsgd`) and `settings` (the `[privacy]` and `[dpsgd]`
sections). The package takes plain values and its own sections, never the whole config.

Only the light modules are imported here: `fedtune.config` imports `settings`, and dp_accounting and scipy
load only when a DP run needs them. No file draws from a global random generator.
"""

from fedtune.privacy.errors import NonFiniteUpdate, PrivacyBudgetExhausted, PrivacyError
from fedtune.privacy.settings import DpSgdConfig, PrivacyConfig

__all__ = [
    "DpSgdConfig",
    "NonFiniteUpdate",
    "PrivacyBudgetExhausted",
    "PrivacyConfig",
    "PrivacyError",
]
