"""The public API as the README shows it: `fedtune.load_config`, `fedtune.simulate`, and a user's own
aggregation rule plugged in without editing fedtune."""

from __future__ import annotations

import torch

import fedtune
from tests.test_simulation import SMALL


def agreeing_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the updates pointing the same way as the coordinate median (cosine > 0)."""
    median = deltas.median(dim=0).values
    agree = torch.nn.functional.cosine_similarity(deltas, median[None], dim=1) > 0
    w = weights * agree
    return (w @ deltas) / w.sum() if w.sum() > 0 else median


def test_a_users_own_rule_runs_through_the_engine(tmp_path):
    config = fedtune.load_config(
        None, [*SMALL, "federation.rounds=1", "run.threads=1", f"run.dir={tmp_path}"]
    )
    threads = torch.get_num_threads()
    seen: list[int] = []

    def rule(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        seen.append(deltas.shape[0])
        return agreeing_mean(deltas, weights)

    result = fedtune.simulate(config, rule=rule)
    assert torch.get_num_threads() == threads  # run.threads held for the run only, the caller's restored
    assert seen == [3]  # called once a round, with every update of the round
    assert [r.round_num for r in result.rounds] == [0, 1]
    assert result.after.loss < result.before.loss
    plain = fedtune.simulate(
        config.model_copy(update={"run": config.run.model_copy(update={"dir": tmp_path / "p"})})
    )
    assert result.after.loss != plain.after.loss  # it really replaced FedAvg


def test_the_extension_points_are_exported():
    for name in ("AggregationRule", "ServerOptimizer", "Trainer", "Transport", "Config", "serve"):
        assert getattr(fedtune, name) is not None
