"""From a config to what the round engine and its participants run: `resolve` and `participant_spec`.

`resolve` is called when a run starts, once its sizes are known (the population, the adapter, the largest
client): it checks the config in the run's mode (`checks.check`), resolves the privacy plan (calibrating
the noise multiplier to a budget, recording it in the returned config for config.toml), and builds the
server's `RunPlan` and DP state. `participant_spec` is what a client needs, and a site builds it from the
config the server sends: the same function on both ends, so weights, local work and encoding agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.compress import CompressionSpec, num_kept
from fedtune.config.checks import Mode, check
from fedtune.config.schema import Config
from fedtune.layout import AdapterLayout
from fedtune.privacy.distributed import check_headroom
from fedtune.privacy.dpfedavg import ClientLevelDp
from fedtune.privacy.plan import plan_privacy
from fedtune.round.personal import PersonalSpec
from fedtune.round.plan import (
    DpRandomness,
    DpSgdAccounting,
    LocalWork,
    ParticipantSpec,
    RunPlan,
    SecureSettings,
    WeightRule,
)
from fedtune.round.profiles import ClientProfile, client_ranks, resolve_profiles
from fedtune.round.sampling import cohort_size, eval_members
from fedtune.round.scaffold import ControlSpec
from fedtune.secagg import FixedPoint


@dataclass(frozen=True)
class Resolved:
    config: Config  # as given, with the resolved noise multiplier and delta under privacy
    plan: RunPlan
    dp: ClientLevelDp | None
    dp_randomness: DpRandomness | None  # what the DP state and the cohort draws use
    notes: list[str]
    profiles: dict[str, ClientProfile]  # each client's `[clients]` profile (simulation only)


def weight_rule(config: Config) -> WeightRule:
    cap = config.data.max_examples_per_client
    return WeightRule(cap=cap if isinstance(cap, int) else None, unit=config.privacy.mode != "off")


def local_work(config: Config) -> LocalWork:
    fed = config.federation
    if fed.local_epochs is not None:
        return LocalWork(epochs=fed.local_epochs)
    return LocalWork(steps=fed.local_steps)


def control_spec(config: Config) -> ControlSpec | None:
    """SCAFFOLD's public numbers (None when server.control_variates is 'none'): eta = train.lr, and the
    scale s = eta * federation.local_steps (eta alone when clients train whole epochs)."""
    if config.server.control_variates == "none":
        return None
    fed, lr = config.federation, config.train.lr
    return ControlSpec(lr=lr, scale=lr * (fed.local_steps if fed.local_epochs is None else 1))


def personal_spec(config: Config) -> PersonalSpec | None:
    p = config.personalize
    return None if p.method == "none" else PersonalSpec(p.method, p.steps, p.lambda_)


def participant_spec(config: Config) -> ParticipantSpec:
    dpsgd = config.dpsgd
    return ParticipantSpec(
        seed=config.run.seed,
        work=local_work(config),
        compression=CompressionSpec.from_config(config.compression),
        weights=weight_rule(config),
        eval_examples=config.eval.max_examples_per_client,
        eval_batch_size=config.eval.batch_size,
        dpsgd=(
            DpSgdAccounting(config.train.batch_size, dpsgd.noise_multiplier, dpsgd.delta)
            if dpsgd.enabled
            else None
        ),
        normalize_steps=config.server.step_normalization == "fednova",
        control=control_spec(config),
        personal=personal_spec(config),
    )


def resolve(
    config: Config,
    mode: Mode,
    *,
    population: Sequence[str],
    adapter_numel: int,
    layout: AdapterLayout | None = None,
    largest_weight: int | None = None,
    dp_state: dict[str, Any] | None = None,
    dp_randomness: DpRandomness | None = None,
    evaluators: int | None = None,
) -> Resolved:
    """The run's plan once its sizes are known. `largest_weight`: the largest client's training examples
    (a simulation knows it; it bounds secure aggregation's encoding when data.max_examples_per_client is
    'all'). `dp_state`: a checkpoint's DP state to resume from. `evaluators`: only the first this many
    clients of the population may evaluate (an audit's canary clients, last, never do); default all."""
    notes = check(config, mode, population=len(population), max_weight=largest_weight)
    profiles = resolve_profiles(config.clients, population, config.run.seed)
    fed, sa = config.federation, config.secure_aggregation
    cohort = cohort_size(len(population), fed.clients_per_round, fed.fraction_per_round)
    selected = cohort
    if mode == "deploy":
        selected = min(len(population), math.ceil(cohort * (1 + config.deploy.over_selection)))
    weights = weight_rule(config)
    compression = CompressionSpec.from_config(config.compression)
    control = control_spec(config)
    vector_size = adapter_numel * (1 if control is None else 2)
    if config.personalize.method == "split":
        if layout is None:
            raise ValueError("split personalization needs the adapter's layout")
        vector_size = int(layout.a_mask.sum())
    if compression.method == "randomk":
        vector_size = num_kept(vector_size, compression.fraction)
    secure = None
    if sa.enabled:
        bound = weights.bound if weights.bound is not None else largest_weight
        if bound is None:
            raise ValueError("secure aggregation needs the largest client weight")
        secure = SecureSettings(
            bits=sa.bits,
            clip_range=sa.clip_range,
            neighbours=sa.neighbours,
            threshold=None if sa.threshold == "auto" else sa.threshold,
            max_weight=bound,
        )
    step = FixedPoint(sa.bits, sa.clip_range, 1, cohort).step if sa.enabled else None
    privacy = plan_privacy(
        config.privacy,
        population=len(population),
        cohort=cohort,
        rounds=fed.rounds,
        adapter_numel=vector_size if sa.enabled else None,
        encoding_step=step,
    )
    dp, randomness = None, None
    if privacy is not None:
        if privacy.distributed is not None:
            check_headroom(cohort, FixedPoint(sa.bits, sa.clip_range, 1, cohort), privacy.distributed)
        randomness = dp_randomness or DpRandomness.from_os()
        if dp_state is not None:
            dp = ClientLevelDp.from_state_dict(privacy, dp_state, randomness.noise)
        else:
            dp = ClientLevelDp(privacy, randomness.noise)
        config = config.model_copy(update={"privacy": privacy.resolved(config.privacy)})
    plan = RunPlan(
        seed=config.run.seed,
        rounds=fed.rounds,
        population=tuple(population),
        cohort=cohort,
        selected=selected,
        min_clients=fed.min_clients,
        eval_every=config.eval.every,
        eval_members=eval_members(
            len(population) if evaluators is None else evaluators, config.eval.max_clients, config.data_seed
        ),
        weights=weights,
        compression=compression,
        adapter_numel=adapter_numel,
        secure=secure,
        privacy=privacy,
        dpsgd=config.dpsgd.enabled,
        reproducible_graph=mode != "deploy",
        normalize_steps=config.server.step_normalization == "fednova",
        layout=layout,
        ranks=client_ranks(profiles, population, config.lora.rank),
        control=control,
        personalize=config.personalize.method != "none",
        split=config.personalize.method == "split",
    )
    return Resolved(config, plan, dp, randomness, notes, profiles)
