"""L2 clipping: the clipped norm never exceeds the bound, whatever the input; NaN/Inf are refused."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedtune.errors import FedtuneError
from fedtune.privacy.clip import clip_l2, l2_norm
from fedtune.privacy.errors import NonFiniteUpdate

F32_MAX = float(np.finfo(np.float32).max)
finite_f32 = st.floats(min_value=-F32_MAX, max_value=F32_MAX, allow_nan=False, width=32)
clip_norms = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


def exact_norm(t: torch.Tensor) -> float:
    """An independent norm: Python's arbitrary-precision-safe hypot over float64 values."""
    return math.hypot(*t.double().tolist()) if t.numel() else 0.0


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=finite_f32), clip_norms)
def test_clipped_norm_never_exceeds_the_bound(values, bound):
    delta = torch.from_numpy(values)
    result = clip_l2(delta, bound)
    assert result.delta.dtype == torch.float32 and result.delta.shape == delta.shape
    assert exact_norm(result.delta) <= bound
    assert result.clipped == (exact_norm(delta) > bound)
    assert math.isclose(result.norm, exact_norm(delta), rel_tol=1e-9)
    if result.clipped:  # the direction is kept and the norm lands on the bound (up to rounding)
        assert exact_norm(result.delta) == pytest.approx(bound, rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(result.delta.double(), delta.double(), dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    else:
        assert torch.equal(result.delta, delta)


@settings(max_examples=100, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 32), elements=finite_f32),
    st.integers(0, 31),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    clip_norms,
)
def test_non_finite_values_are_refused(values, where, bad, bound):
    values = values.copy()
    values[where % len(values)] = bad
    with pytest.raises(NonFiniteUpdate) as info:
        clip_l2(torch.from_numpy(values), bound)
    assert isinstance(info.value, FedtuneError)


def test_huge_values_do_not_overflow():
    huge = torch.full((1000,), F32_MAX)  # squares overflow float32; the norm itself does not
    result = clip_l2(huge, 1.0)
    assert result.clipped and exact_norm(result.delta) <= 1.0
    assert result.norm == pytest.approx(F32_MAX * math.sqrt(1000), rel=1e-12)
    extreme = torch.tensor([1.5e308, -1.5e308, 1.5e308], dtype=torch.float64)  # norm beyond float64's max
    result = clip_l2(extreme, 2.0)
    assert result.norm == math.inf and result.clipped
    assert exact_norm(result.delta) <= 2.0
    expected = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64) * 2 / math.sqrt(3)
    assert torch.allclose(result.delta, expected)


def test_tiny_and_zero_deltas():
    assert l2_norm(torch.zeros(5)) == 0.0
    tiny = torch.full((4,), 1e-45)  # float32 subnormals: scaling first keeps the norm from vanishing
    assert l2_norm(tiny) == pytest.approx(2 * float(tiny[0]), rel=1e-6)
    assert not clip_l2(torch.zeros(3), 1.0).clipped


def test_bad_bounds_and_dtypes_are_refused():
    for bound in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            clip_l2(torch.ones(2), bound)
    with pytest.raises(TypeError):
        clip_l2(torch.ones(2, dtype=torch.int64), 1.0)
