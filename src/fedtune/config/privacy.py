"""The privacy rules of `config.checks.check`: client-level DP, DP-SGD and secure aggregation, and the
cohort size they are checked against.

Each `check_*` raises ConfigError (one line naming the fields, the values and the fix) when a setting
cannot be run or accounted; `check` calls the ones whose section is enabled.
"""

from __future__ import annotations

from typing import Literal

from fedtune.config.schema import Config
from fedtune.errors import ConfigError
from fedtune.privacy.settings import check_accountable
from fedtune.secagg.fixedpoint import check_overflow
from fedtune.secagg.graph import resolve_neighbours

Mode = Literal["simulate", "deploy"]
_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings")


def cohort_bound(config: Config, population: int | None = None) -> int | None:
    """The most clients a round samples, when it is known (or `population` is given)."""
    fed = config.federation
    size = population if population is not None else with_canaries(config, fed.num_clients)
    if fed.fraction_per_round is not None:
        return None if size == "all" else max(1, round(fed.fraction_per_round * size))
    return fed.clients_per_round if size == "all" else min(fed.clients_per_round, size)


def with_canaries(config: Config, num_clients: int | Literal["all"]) -> int | Literal["all"]:
    """The population with an audit's canary clients, which are sampled like the real ones."""
    if num_clients == "all" or not config.audit.enabled:
        return num_clients
    return num_clients + config.audit.canaries


def check_privacy(config: Config, population: int | None) -> None:
    """Client-level DP: what cannot be run or accounted."""
    p = config.privacy
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError(
            f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier or privacy.target_epsilon (or both)"
        )
    if config.server.rule == "norm_bound":
        raise ConfigError(
            f"privacy.mode = {p.mode!r} already clips every update to privacy.clip_l2_norm before its noised "
            "sum, and server.rule = 'norm_bound' would clip again to a bound (the round's median norm, by "
            "default) the accountant does not know; use server.rule = 'fedavg'"
        )
    if config.server.rule != "fedavg":
        raise ConfigError(
            f"privacy.mode = {p.mode!r} bounds one client's effect on the SUM of deltas, and "
            f"server.rule = {config.server.rule!r} is not a sum; use server.rule = 'fedavg'"
        )
    check_accountable(p.accountant, p.sampling, "skellam" if p.mode == "distributed" else "gaussian")
    if config.federation.min_clients > 1:
        raise ConfigError(
            f"federation.min_clients = {config.federation.min_clients} with privacy.mode = {p.mode!r}: under "
            "client-level DP every round releases its noised sum (a missing update counts as zero), since "
            "failing a round for too few updates would reveal who took part; leave it at 1"
        )
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
            cohort = cohort_bound(config, population)
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


def check_dpsgd(config: Config) -> None:
    """DP-SGD works with LoRA on linear layers, not on embeddings (checked again on the built model by
    `train.dpsgd.check_dpsgd_model`, whatever the module names)."""
    if config.train.proximal_mu > 0:
        raise ConfigError(
            f"train.proximal_mu = {config.train.proximal_mu:g} with dpsgd.enabled: the DP-SGD trainer does "
            "not add FedProx's proximal term; set train.proximal_mu = 0 or dpsgd.enabled = false"
        )
    named = [] if config.lora.target_modules == "auto" else config.lora.target_modules  # auto: no embeddings
    embeddings = [m for m in named if m in _EMBEDDINGS]
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


def check_secure_aggregation(
    config: Config, mode: Mode | None, population: int | None, max_weight: int | None
) -> None:
    """Secure aggregation reveals only the sum: refuse rules that need each update, cohorts it cannot
    cover, and encodings that could overflow."""
    sa, rule = config.secure_aggregation, config.server.rule
    if rule != "fedavg":
        raise ConfigError(
            f"server.rule = {rule!r} needs every client's update, but secure aggregation reveals only "
            "their sum; use server.rule = 'fedavg' or set secure_aggregation.enabled = false"
        )
    if config.privacy.mode != "off" and config.privacy.sampling == "poisson":
        raise ConfigError(
            "privacy.sampling = 'poisson' draws a cohort of random size, which can fall below "
            "secure_aggregation.threshold and abort the round; use privacy.sampling = 'fixed' with "
            "secure aggregation"
        )
    cap = config.data.max_examples_per_client
    if mode == "deploy" and config.privacy.mode == "off" and cap == "all":
        raise ConfigError(
            "secure aggregation needs a public bound on each client's weight to size its encoding; set "
            "data.max_examples_per_client to a number (each client's weight is capped at it)"
        )
    cohort = cohort_bound(config, population)
    if cohort is None:
        return
    if cohort < 2:
        raise ConfigError(
            f"secure aggregation needs at least 2 clients per round, and this config has {cohort}; "
            "raise federation.clients_per_round"
        )
    k = resolve_neighbours(sa.neighbours, cohort)
    if sa.threshold != "auto" and not 2 <= sa.threshold <= k + 1:
        raise ConfigError(
            f"secure_aggregation.threshold = {sa.threshold}: allowed 2 to {k + 1} "
            f"(each client's secret has k + 1 = {k + 1} holders with {cohort} clients per round)"
        )
    weight = 1 if config.privacy.mode != "off" else max_weight  # DP updates all weigh 1
    if weight is None and cap != "all":
        weight = cap
    if weight is not None:
        check_overflow(cohort, weight, sa.bits, sa.clip_range)
