"""`[audit]`: what it refuses, at load or where a mode cannot honour it, and `fedtune audit` itself."""

import json

import pytest

from fedtune.compare.runner import compare
from fedtune.config import load_config, to_toml
from fedtune.config.checks import check
from fedtune.errors import ConfigError
from fedtune.simulation import simulate
from tests.test_cli import fedtune

DEPLOY = ["deploy.clients=['a', 'b', 'c', 'd']", "federation.clients_per_round=2"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["audit.canaries=32"], "audit.canaries is set but audit.enabled is false: run `fedtune audit`"),
        (["audit.enabled=true", "audit.text_digits=2", "audit.text_candidates=100"], "raise text_digits"),
        (["audit.enabled=true", "audit.confidence=1.0"], "audit.confidence"),
        (
            ["audit.enabled=true", "federation.topology='decentralized'"],
            "a decentralized federation does not have; set federation.topology = 'star'",
        ),
        (
            [
                "audit.enabled=true",
                "privacy.mode='central'",
                "privacy.noise_multiplier=1.0",
                "audit.delta=1e-5",
            ],
            "remove audit.delta and set privacy.delta",
        ),
        (
            [
                "audit.enabled=true",
                "audit.canaries=8",
                "federation.num_clients=4",
                "federation.clients_per_round=13",
            ],
            "exceeds federation.num_clients = 4 + audit.canaries = 8",
        ),
    ],
)
def test_refused_at_load_naming_the_field_and_the_fix(sets, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, sets)
    assert message in str(caught.value)


def test_the_canaries_count_in_the_population():
    config = load_config(None, ["audit.enabled=true", "audit.canaries=8", "federation.num_clients=4"])
    assert config.federation.clients_per_round == 4  # 4 of 12: allowed, canaries are sampled too
    load_config(None, ["audit.enabled=true", "audit.canaries=8", "federation.clients_per_round=12"])


def test_a_resolved_config_with_the_audit_off_reloads(tmp_path):
    path = tmp_path / "config.toml"  # config.toml writes every default of [audit] out
    path.write_text(to_toml(load_config(None, [])))
    assert "[audit]" in path.read_text()
    assert not load_config(path, []).audit.enabled


def test_a_deployment_refuses_the_audit():
    with pytest.raises(ConfigError, match="a deployment's clients are real and its server cannot plant any"):
        check(load_config(None, [*DEPLOY, "audit.enabled=true"]), "deploy")
    check(load_config(None, DEPLOY), "deploy")  # without [audit], fine


def test_secure_aggregation_is_fine():
    check(
        load_config(None, ["audit.enabled=true", "secure_aggregation.enabled=true"]),
        "simulate",
        population=80,
    )


def test_compare_refuses_the_audit(tmp_path):
    config = load_config(None, ["audit.enabled=true", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="fedtune audit CONFIG"):
        compare(config, 1)


def test_a_canary_text_longer_than_an_example_is_refused_before_training(tmp_path):
    sets = ["model.name=tiny", "data.max_seq_len=8", "audit.enabled=true", f"run.dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"over data\.max_seq_len = 8: shorten audit\.text_prefix"):
        simulate(load_config(None, sets))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_fedtune_audit_prints_the_bound_next_to_the_accountant(tmp_path):
    sets = [
        "model.name=tiny",
        "data.max_seq_len=32",
        "data.max_examples_per_client=16",
        "federation.num_clients=2",
        "federation.clients_per_round=24",
        "federation.rounds=2",
        "federation.local_steps=1",
        "lora.target_modules=['q_proj']",
        "eval.max_examples_per_client=2",
        "simulation.backend='serial'",
        "privacy.mode='central'",
        "privacy.noise_multiplier=2.0",
        "privacy.delta=1e-5",
        "audit.canaries=32",
        "audit.text_canaries=2",
        "audit.text_candidates=15",
        f"run.dir={tmp_path}",
    ]
    proc = fedtune("audit", *(arg for s in sets for arg in ("--set", s)))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert f"epsilon lower bound {saved['epsilon_lower_bound']:.3f}" in proc.stdout
    assert f"accountant: {saved['accounted_epsilon']:.3g}" in proc.stdout
    assert saved["epsilon_lower_bound"] <= saved["accounted_epsilon"]
    assert "canary text exposure (of 4.00 bits)" in proc.stdout
