"""The audit end to end on the tiny model: a regression test for the DP code.

Without noise the canaries' directions stand out in the final adapter and the lower bound is large; with
DP-FedAvg's noise it stays under the accounted epsilon; and with the noise silently dropped from a DP run
(the bug this audit exists to catch) the lower bound exceeds the accounted epsilon.
"""

import json

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.privacy.dpfedavg import ClientLevelDp
from fedtune.round.plan import DpRandomness
from fedtune.simulation import simulate

# two real clients and 64 canary clients; 48 of the 66 are sampled each round, so almost every included
# canary is in some round (about 9 s a run on 2 cores)
AUDIT = [
    "model.name=tiny",
    "data.max_seq_len=32",
    "data.max_examples_per_client=16",
    "federation.num_clients=2",
    "federation.clients_per_round=48",
    "federation.rounds=3",
    "federation.local_steps=2",
    "train.lr=0.05",
    "lora.target_modules=['q_proj', 'v_proj']",
    "eval.every=3",
    "eval.max_examples_per_client=2",
    "simulation.backend='serial'",
    "audit.enabled=true",
    "audit.canaries=64",
]
# Poisson sampling at z = 4 accounts epsilon ~ 1.41 at delta 1e-5 over the 3 rounds
DP = [
    "privacy.mode='central'",
    "privacy.noise_multiplier=4.0",
    "privacy.delta=1e-5",
    "privacy.sampling='poisson'",
]


def seeded_dp(seed: int = 0) -> DpRandomness:  # tests only: a seeded generator breaks the guarantee
    return DpRandomness(
        torch.Generator().manual_seed(seed), np.random.default_rng(seed), np.random.default_rng(seed + 1)
    )


def test_without_noise_the_canaries_give_a_large_lower_bound(tmp_path):
    config = load_config(
        None,
        [
            *AUDIT,
            "audit.delta=1e-5",
            "audit.text_canaries=4",
            "audit.text_candidates=63",
            f"run.dir={tmp_path}",
        ],
    )
    result = simulate(config)
    audit = result.audit
    assert audit is not None and audit.accounted_epsilon is None
    assert audit.white_box.epsilon > 1.5
    assert audit.white_box.correct == audit.white_box.guesses >= 24
    assert audit.included_score_mean > 10 * abs(audit.excluded_score_mean)
    assert audit.exposures is not None and len(audit.exposures.inserted) + len(audit.exposures.controls) == 4
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["epsilon_lower_bound"] == pytest.approx(audit.white_box.epsilon)
    assert saved["black_box"]["max_possible_exposure"] == pytest.approx(6.0)
    report = (tmp_path / "report.md").read_text()
    assert "## Audit" in report and f"{audit.white_box.epsilon:.3f}" in report
    assert "## Rounds" in report  # the run's own report is still there
    # the canaries never evaluate: only the two real clients are in clients.json
    assert len(json.loads((tmp_path / "clients.json").read_text())) == 2


def test_with_dp_the_lower_bound_stays_under_the_accounted_epsilon(tmp_path):
    config = load_config(None, [*AUDIT, *DP, "audit.text_canaries=0", f"run.dir={tmp_path}"])
    audit = simulate(config, dp_randomness=seeded_dp()).audit
    assert audit is not None and audit.accounted_epsilon is not None
    assert audit.delta == 1e-5
    assert 1.0 < audit.accounted_epsilon < 2.0
    assert audit.white_box.epsilon <= audit.accounted_epsilon
    assert not audit.exceeds_accountant


def test_dp_without_its_noise_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(ClientLevelDp, "add_noise", lambda self, total: total)  # the bug: no noise
    config = load_config(None, [*AUDIT, *DP, "audit.text_canaries=0", f"run.dir={tmp_path}"])
    audit = simulate(config, dp_randomness=seeded_dp()).audit
    assert audit is not None and audit.accounted_epsilon is not None
    assert audit.white_box.epsilon > audit.accounted_epsilon
    assert audit.exceeds_accountant
    assert "exceeds the accounted epsilon" in (tmp_path / "report.md").read_text()
