"""Differential privacy inside the simulation: epsilon per round, the budget stop, distributed noise."""

import tomllib
from itertools import pairwise

import pytest

from fedtune.config import load_config
from fedtune.rundir import RunDir
from fedtune.simulation import simulate
from tests.test_simulation import SMALL

CENTRAL = [*SMALL, "privacy.mode='central'", "privacy.clip_l2_norm=1.0"]


def test_central_dp_reports_growing_epsilon_and_records_the_plan(tmp_path):
    result = simulate(load_config(None, [*CENTRAL, "privacy.target_epsilon=30", f"run.dir={tmp_path}"]))
    epsilons = [r.privacy.epsilon for r in result.rounds]
    assert epsilons[0] == 0.0
    assert all(a < b for a, b in pairwise(epsilons))
    assert epsilons[-1] <= 30.0  # calibrated to spend the budget over the configured rounds, not more
    assert epsilons[-1] > 0.98 * 30.0  # calibrated to the bound it reports: the budget is spent
    resolved = tomllib.loads((tmp_path / "config.toml").read_text())["privacy"]
    assert resolved["noise_multiplier"] > 0 and 0 < resolved["delta"] < 1
    assert resolved["sampling"] == "fixed"
    assert all(r.privacy.noise_std == pytest.approx(resolved["noise_multiplier"]) for r in result.rounds[1:])


def test_run_stops_before_the_budget_is_exceeded(tmp_path):
    # z = 0.5 spends ~16 per round here: a second round would pass 20
    config = load_config(
        None,
        [
            *CENTRAL,
            "privacy.noise_multiplier=0.5",
            "privacy.target_epsilon=20",
            "eval.every=2",
            f"run.dir={tmp_path}",
        ],
    )
    result = simulate(config)
    assert [r.round_num for r in result.rounds] == [0, 1]
    assert result.rounds[-1].privacy.epsilon <= 20
    assert result.rounds[-1].eval == result.after  # the adapter it ends with is evaluated
    assert any("stopped before round 2" in note for note in result.notes)


def test_distributed_noise_through_secure_aggregation(tmp_path):
    config = load_config(
        None,
        [
            *SMALL,
            "privacy.mode='distributed'",
            "privacy.noise_multiplier=0.5",
            "privacy.clip_l2_norm=1.0",
            "secure_aggregation.enabled=true",
            "secure_aggregation.clip_range=1.0",
            f"run.dir={tmp_path}",
        ],
    )
    result = simulate(config)
    for r in result.rounds[1:]:
        assert r.secagg.abort is None
        assert r.secagg.survivors == (3, 3, 3, 3)
        assert r.privacy.epsilon > 0
    assert result.rounds[-1].privacy.epsilon > result.rounds[1].privacy.epsilon


def test_dpsgd_clients_report_their_per_record_epsilon(tmp_path):
    config = load_config(
        None,
        [
            *SMALL,
            "federation.rounds=2",
            "lora.target_modules=['q_proj', 'v_proj']",
            "dpsgd.enabled=true",
            "dpsgd.noise_multiplier=1.0",
            "dpsgd.delta=1e-3",
            f"run.dir={tmp_path}",
        ],
    )
    result = simulate(config)
    epsilons = [r.dpsgd_epsilon_max for r in result.rounds[1:]]
    assert 0 < epsilons[0] <= epsilons[1]
    assert all(r.clients == 3 for r in result.rounds[1:])


def test_poisson_cohorts_are_drawn_as_accounted_and_not_published(tmp_path):
    config = load_config(
        None,
        [
            *CENTRAL,
            "privacy.noise_multiplier=1.0",
            "privacy.sampling='poisson'",
            "federation.rounds=4",
            f"run.dir={tmp_path}",
        ],
    )
    result = simulate(config)
    rows = RunDir(result.run_dir).read_metrics()[1:]
    assert all("client_ids" not in row for row in rows)  # who took part is part of the guarantee
    assert all(0 <= row["selected"] <= 6 for row in rows)
    assert all(row["round_failed"] is None for row in rows)  # an empty cohort still releases its noise
    fixed = simulate(
        load_config(
            None,
            [
                *CENTRAL,
                "privacy.noise_multiplier=1.0",
                "federation.rounds=4",
                f"run.dir={tmp_path / 'fixed'}",
            ],
        )
    )
    assert rows[-1]["epsilon"] < fixed.rounds[-1].privacy.epsilon  # Poisson amplification is tighter


def test_poisson_sampling_with_secure_aggregation_is_refused():
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"secure_aggregation\.threshold"):
        load_config(
            None,
            [
                *CENTRAL,
                "privacy.noise_multiplier=1.0",
                "privacy.sampling='poisson'",
                "secure_aggregation.enabled=true",
            ],
        )


def test_adaptive_clipping_moves_the_clip_norm(tmp_path):
    config = load_config(
        None,
        [
            *CENTRAL,
            "privacy.noise_multiplier=0.1",
            "privacy.adaptive_clipping=true",
            "privacy.clipped_count_stddev=0.1",  # fraction noise ~0.03 with 3 clients
            "privacy.clip_l2_norm=0.001",  # far below these updates' norms: every client is clipped
            f"run.dir={tmp_path}",
        ],
    )
    rounds = simulate(config).rounds[1:]
    norms = [r.privacy.clip_l2_norm for r in rounds]
    assert norms[0] == 0.001
    assert all(a < b for a, b in pairwise(norms))  # none fits, far below the 0.5 target: C grows
    assert all(r.privacy.unclipped_fraction < 0.25 for r in rounds)
