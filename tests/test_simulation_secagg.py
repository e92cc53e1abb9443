"""Secure aggregation inside the simulation: the plaintext run's metrics up to quantization, dropouts."""

import pytest

from fedtune.config import load_config
from fedtune.simulation import simulate
from tests.test_simulation import SMALL

# lm_head LoRA deltas at lr 0.05 reach a few tenths per coordinate: give them room, and fine steps
# (2 / 2^22 = 5e-7) since this tiny model at a high lr amplifies rounding error over rounds
SECURE = [
    *SMALL,
    "secure_aggregation.enabled=true",
    "secure_aggregation.clip_range=1.0",
    "secure_aggregation.bits=22",
]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return simulate(load_config(None, [*SMALL, f"run.dir={tmp_path_factory.mktemp('plain')}"]))


def test_secure_run_matches_plaintext_up_to_quantization(plain, tmp_path):
    secure = simulate(load_config(None, [*SECURE, f"run.dir={tmp_path}"]))
    for p, s in zip(plain.rows, secure.rows, strict=True):
        assert s["clients"] == p["clients"]
        assert s["eval_loss"] == pytest.approx(p["eval_loss"], rel=1e-3)
    for row in secure.rows[1:]:
        assert row["secagg_survivors"] == [3, 3, 3, 3]
        assert row["secagg_clipped"] == 0
        # masked payload: 32-bit words per parameter, plus keys and shares
        assert 1.0 <= row["secagg_bytes_up_per_client"] / (4 * secure.adapter_numel) <= 1.1
    assert secure.rows[-1]["eval_loss"] != plain.rows[-1]["eval_loss"]  # really went through the encoding


def run_with_dropouts(tmp_path, clients: int, rate: float):
    return simulate(
        load_config(
            None,
            [
                *SECURE,
                f"federation.num_clients={clients}",
                f"federation.clients_per_round={clients}",
                f"secure_aggregation.dropout_rate={rate}",
                "secure_aggregation.neighbours='all'",
                f"run.dir={tmp_path}",
            ],
        )
    )


def test_dropouts_at_every_stage_are_survived(tmp_path):
    result = run_with_dropouts(tmp_path, clients=8, rate=0.05)
    rows = result.rows[1:]
    assert all("secagg_abort" not in r for r in rows)
    survivors = [r["secagg_survivors"] for r in rows]
    assert any(s[-1] < 8 for s in survivors), "with 5% dropout per stage some client should drop"
    for row, s in zip(rows, survivors, strict=True):
        assert s == sorted(s, reverse=True)
        assert row["clients"] == s[2] >= row["secagg_threshold"]  # the mean is over masked inputs
    assert result.after.loss < result.before.loss


def test_below_threshold_the_round_aborts_and_the_model_stays(tmp_path):
    result = run_with_dropouts(tmp_path, clients=6, rate=0.3)
    aborted = [r for r in result.rows[1:] if "secagg_abort" in r]
    assert aborted, "30% dropout per stage leaves fewer than the threshold of 4 of 6"
    for row in aborted:
        assert row["clients"] == 0
        assert "threshold" in row["secagg_abort"]
    if len(aborted) == len(result.rows) - 1:
        assert result.after.loss == result.before.loss  # no round applied anything
