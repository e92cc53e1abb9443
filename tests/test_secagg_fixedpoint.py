"""Fixed-point encoding: known answers, unbiased rounding, counted clipping, and the overflow check."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.errors import ConfigError
from fedtune.secagg.fixedpoint import FixedPoint, check_overflow, decode, encode, max_bits, quantize


def test_quantize_known_values_and_range():
    spec = FixedPoint(bits=2, clip_range=1.0)  # levels 0..3 for -1, -1/3, 1/3, 1
    q, clipped = quantize(
        np.array([-1.0, -1 / 3, 1 / 3, 1.0, -5.0, 7.0], np.float32), spec, np.random.default_rng(0)
    )
    assert q.tolist() == [0, 1, 2, 3, 0, 3]
    assert clipped == 2


def test_stochastic_rounding_is_unbiased_and_within_a_step():
    spec = FixedPoint(bits=4, clip_range=1.0)
    x = np.full(200_000, 0.3, np.float32)  # 0.3 -> 9.75 levels: 9 a quarter of the time, 10 otherwise
    q, _ = quantize(x, spec, np.random.default_rng(1))
    assert set(q.tolist()) == {9, 10}
    assert abs(q.mean() - 9.75) < 0.01


def test_payload_and_decode_known_answer():
    spec = FixedPoint(bits=2, clip_range=1.0, max_weight=3, max_clients=2)
    rng = np.random.default_rng(0)
    a = encode(np.array([1.0, -1.0, 9.0], np.float32), 1, spec, rng)
    b = encode(np.array([-1.0, -1.0, 1.0], np.float32), 3, spec, rng)
    assert a.tolist() == [3, 0, 3, 1, 1] and b.tolist() == [0, 0, 9, 3, 0]
    decoded = decode(a + b, spec)  # (1 * 1 + 3 * -1) / 4 = -0.5 ; -1 ; 1
    assert decoded.mean.tolist() == [-0.5, -1.0, 1.0]
    assert (decoded.total_weight, decoded.clipped) == (4, 1)


def test_bad_inputs_are_refused():
    spec = FixedPoint(bits=8, clip_range=1.0, max_weight=10)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([0.0, np.nan], np.float32), spec, rng)
    with pytest.raises(ValueError, match="max_weight"):
        encode(np.zeros(3, np.float32), 11, spec, rng)
    with pytest.raises(ValueError, match="integer"):
        encode(np.zeros(3, np.float32), 2.5, spec, rng)


def test_overflow_check_names_fields_and_fix():
    check_overflow(4, 256, 16, 0.1)
    check_overflow(50, 256, 18, 0.1)  # 50 * 256 * (2^18 - 1) < 2^32
    with pytest.raises(ConfigError, match=r"secure_aggregation\.bits = 19 could overflow") as err:
        check_overflow(50, 256, 19, 0.1)
    assert "to 18 or less" in str(err.value) and "secure_aggregation.clip_range" in str(err.value)
    with pytest.raises(ConfigError, match="fewer clients"):
        check_overflow(2**20, 2**12, 1, 0.1)
    with pytest.raises(ConfigError, match=r"secure_aggregation\.clip_range"):
        check_overflow(4, 1, 8, 0.0)
    with pytest.raises(ConfigError, match=r"secure_aggregation\.bits = 32"):
        check_overflow(1, 1, 32, 1.0)
    assert [max_bits(1, 1), max_bits(2, 1), max_bits(4, 1), max_bits(50, 256)] == [31, 31, 30, 18]


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=50),
    weight=st.integers(1, 100),
    bits=st.integers(1, 20),
)
def test_decode_of_one_payload_is_within_a_step_of_the_clipped_value(values, weight, bits):
    spec = FixedPoint(bits=bits, clip_range=0.5, max_weight=100, max_clients=1)
    x = np.array(values, np.float32)
    payload = encode(x, weight, spec, np.random.default_rng(0))
    decoded = decode(payload, spec)
    assert np.abs(decoded.mean - np.clip(x, -0.5, 0.5)).max() <= spec.step * (1 + 1e-6)
    assert decoded.clipped == int(np.count_nonzero(np.abs(x) > 0.5)) and decoded.total_weight == weight
