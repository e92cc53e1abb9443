"""The [privacy] and [dpsgd] sections: refusals with the reason, and the plan a run resolves from them."""

import pytest
from pydantic import ValidationError

from fedtune.config import Config, check, to_toml, validate
from fedtune.errors import ConfigError
from fedtune.privacy.plan import plan_privacy as plan_section
from fedtune.privacy.settings import PrivacyConfig


def config(**sections) -> Config:
    return Config.model_validate(sections)


def plan_privacy(cfg: Config, **sizes):
    """The `[privacy]` plan over the config's rounds (the section and plain sizes, never the config)."""
    return plan_section(cfg.privacy, rounds=cfg.federation.rounds, **sizes)


@pytest.mark.parametrize(
    "sections,reason",
    [
        ({"privacy": {"mode": "central"}}, "needs privacy.noise_multiplier or privacy.target_epsilon"),
        (
            {"privacy": {"mode": "distributed", "noise_multiplier": 1.0}},
            "set secure_aggregation.enabled = true",
        ),
        (
            {
                "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "adaptive_clipping": True},
                "secure_aggregation": {"enabled": True},
            },
            "adaptive_clipping needs a noised count",
        ),
        (
            {
                "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "accountant": "pld"},
                "secure_aggregation": {"enabled": True},
            },
            "no privacy loss distribution",
        ),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1.0, "accountant": "pld"}},
            "no sampling without",
        ),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1.0}, "server": {"rule": "median"}},
            "not a sum",
        ),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0, "delta": 0.1}}, "not below 1 / population"),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1.0, "adaptive_clipping": True}},
            "clipped_count_stddev above 0.5",
        ),
        ({"dpsgd": {"enabled": True, "delta": 0.01}}, "1 / data.max_examples_per_client"),
    ],
)
def test_refusals_name_the_reason(sections, reason):
    with pytest.raises(ConfigError, match=reason):  # refused when the config is loaded
        validate(sections)


def test_fields_are_validated_and_typed():
    with pytest.raises(ValidationError):
        PrivacyConfig(mode="local")
    with pytest.raises(ValidationError):
        PrivacyConfig(target_quantile=1.0)
    with pytest.raises(ValidationError):
        PrivacyConfig(unknown=1)
    check(config())  # off: nothing to check
    check(config(privacy={"mode": "central", "target_epsilon": 5.0, "sampling": "poisson"}), "simulate")
    with pytest.raises(ConfigError, match="simulated only"):
        check(
            config(
                privacy={"mode": "central", "target_epsilon": 5.0, "sampling": "poisson"},
                deploy={"clients": ["a", "b", "c", "d"]},
            ),
            "deploy",
        )
    with pytest.raises(ConfigError, match=r"federation\.min_clients = 2 with privacy"):
        validate({"privacy": {"mode": "central", "noise_multiplier": 1.0}, "federation": {"min_clients": 2}})


def test_plan_calibrates_z_and_the_resolved_config_records_it():
    cfg = config(
        privacy={"mode": "central", "target_epsilon": 4.0, "sampling": "poisson"},
        federation={"rounds": 10, "num_clients": 50, "clients_per_round": 5},
    )
    plan = plan_privacy(cfg, population=50, cohort=5)
    assert plan is not None and plan.delta == pytest.approx(50**-1.1)
    assert plan.sampling.probability == pytest.approx(0.1)
    from fedtune.privacy.accountant import Accountant

    accountant = Accountant(plan.accountant, plan.sampling)
    accountant.step(plan.mechanism(), rounds=10)
    assert 0.98 * 4.0 <= accountant.epsilon(plan.delta) <= 4.0
    resolved = cfg.model_copy(update={"privacy": plan.resolved(cfg.privacy)})
    text = to_toml(resolved)
    assert f"noise_multiplier = {plan.noise_multiplier}" in text and "delta = " in text
    assert 'sampling = "poisson"' in text
    again = plan_privacy(Config.model_validate(resolved.model_dump()), population=50, cohort=5)
    assert again is not None and again.noise_multiplier == plan.noise_multiplier  # both set: z as given


def test_distributed_plan_has_a_share_per_client_and_accounts_skellam():
    from fedtune.secagg.fixedpoint import FixedPoint

    cfg = config(
        privacy={"mode": "distributed", "noise_multiplier": 1.0, "clip_l2_norm": 0.1},
        secure_aggregation={"enabled": True},
    )
    spec = FixedPoint(bits=16, clip_range=0.1, max_weight=1, max_clients=4)
    plan = plan_privacy(cfg, population=16, cohort=4, adapter_numel=3584, encoding_step=spec.step)
    assert plan is not None and plan.distributed is not None
    assert plan.distributed.total_variance == pytest.approx((0.1 / spec.step) ** 2)
    assert plan.mechanism(4).variance == pytest.approx(plan.distributed.total_variance)


def test_central_noise_on_a_secure_sum_keeps_room_for_quantization():
    import torch

    from fedtune.privacy.dpfedavg import ClientLevelDp
    from fedtune.secagg.fixedpoint import FixedPoint

    cfg = config(
        privacy={"mode": "central", "noise_multiplier": 1.0, "clip_l2_norm": 0.5},
        secure_aggregation={"enabled": True},
    )
    spec = FixedPoint(bits=16, clip_range=0.1, max_weight=1, max_clients=4)
    with pytest.raises(ValueError, match="adapter_numel"):
        plan_privacy(cfg, population=16, cohort=4, encoding_step=spec.step)
    plan = plan_privacy(cfg, population=16, cohort=4, adapter_numel=10_000, encoding_step=spec.step)
    assert plan is not None and plan.clip_margin == pytest.approx(100 * spec.step)
    dp = ClientLevelDp(plan, torch.Generator())
    assert dp.client_clip_l2_norm == pytest.approx(0.5 - plan.clip_margin)  # what clients clip to
    tiny = config(
        privacy={"mode": "central", "noise_multiplier": 1.0, "clip_l2_norm": 5e-4},
        secure_aggregation={"enabled": True},
    )
    with pytest.raises(ConfigError, match="too small for secure aggregation's"):
        plan_privacy(tiny, population=16, cohort=4, adapter_numel=10_000, encoding_step=spec.step)


def test_dpsgd_on_embeddings_is_refused_at_load():
    with pytest.raises(ConfigError, match="is an embedding"):
        validate({"dpsgd": {"enabled": True}, "lora": {"target_modules": ["embed_tokens", "q_proj"]}})
