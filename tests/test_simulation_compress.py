"""Compression in the simulation: fewer bytes up, still learning, and random-k under secure aggregation."""

import pytest

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.simulation import simulate
from tests.test_simulation import SMALL


def run(tmp_path, *extra: str):
    # a stable learning rate: at SMALL's 0.05 the tiny model's eval loss jumps between rounds even
    # without compression, and a 5% comparison measures that jitter instead of the compression
    return simulate(load_config(None, [*SMALL, "train.lr=0.02", *extra, f"run.dir={tmp_path}"]))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain"))


def test_4bit_quantization_cuts_bytes_8x_and_still_learns(plain, tmp_path):
    q4 = run(tmp_path, "compression.method='quantize'", "compression.bits=4")
    for p, q in zip(plain.rounds[1:], q4.rounds[1:], strict=True):
        assert p.bytes_up / q.bytes_up >= 8
        assert p.bytes_down == q.bytes_down
    assert q4.after.loss < q4.before.loss - 0.5
    assert q4.after.loss == pytest.approx(plain.after.loss, rel=0.05)


def test_topk_with_error_feedback_sends_a_sliver(plain, tmp_path):
    topk = run(tmp_path, "compression.method='topk'", "compression.bits=16", "compression.fraction=0.01")
    for p, t in zip(plain.rounds[1:], topk.rounds[1:], strict=True):
        assert p.bytes_up / t.bytes_up >= 50
    assert topk.after.loss < topk.before.loss


def test_randomk_composes_with_secure_aggregation(tmp_path):
    result = run(
        tmp_path,
        "compression.method='randomk'",
        "compression.bits=32",
        "compression.fraction=0.1",
        "secure_aggregation.enabled=true",
        "secure_aggregation.clip_range=1.0",
        "secure_aggregation.bits=22",
    )
    kept_words = round(0.1 * result.adapter_numel)
    for r in result.rounds[1:]:
        # each client masks only the round's shared coordinates: ~k 32-bit words, not the whole adapter
        assert r.secagg is not None
        assert 4 * kept_words <= r.secagg.bytes_up_per_client <= 1.1 * 4 * kept_words
    assert result.after.loss < result.before.loss


def test_combinations_that_do_not_compose_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"use compression\.method = 'randomk'"):
        load_config(None, ["compression.method='topk'", "secure_aggregation.enabled=true"])
    with pytest.raises(ConfigError, match=r"secure_aggregation\.bits"):
        load_config(None, ["compression.method='quantize'", "secure_aggregation.enabled=true"])
