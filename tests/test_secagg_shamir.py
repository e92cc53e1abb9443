"""Shamir sharing over 2^521 - 1 against known answers, and its threshold behaviour."""

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.secagg import shamir
from fedtune.secagg.shamir import PRIME


def test_known_polynomial_gives_known_shares():
    # f(x) = 1234 + 166 x + 94 x^2, the textbook example.
    shares = shamir.split(1234, [1, 2, 3, 4, 5, 6], 3, coefficients=[166, 94])
    assert shares == {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}


def test_reconstruct_from_any_t_shares():
    shares = {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    for subset in itertools.combinations(shares.items(), 3):
        assert shamir.reconstruct(list(subset)) == 1234


def test_reduction_mod_p_known_answer():
    # f(x) = (p - 1) + x: f(1) = 0, f(2) = 1 mod p, and interpolation wraps back to p - 1.
    shares = shamir.split(PRIME - 1, [1, 2], 2, coefficients=[1])
    assert shares == {1: 0, 2: 1}
    assert shamir.lagrange_at_zero([1, 2]) == [2, PRIME - 1]
    assert shamir.reconstruct(shares) == PRIME - 1


def test_random_256_bit_secret_needs_t_shares():
    secret = secrets.randbits(256)
    shares = shamir.split(secret, list(range(1, 14)), 7)
    points = sorted(shares.items())
    assert shamir.reconstruct(points[:7]) == secret
    assert shamir.reconstruct(points[-7:]) == secret
    assert shamir.reconstruct(points[:6]) != secret  # t - 1 shares: an unrelated field element


def test_share_bytes_round_trip_and_refusals():
    value = PRIME - 2
    raw = shamir.to_bytes(value)
    assert len(raw) == shamir.SHARE_BYTES == 66
    assert shamir.from_bytes(raw) == value
    with pytest.raises(ValueError):
        shamir.from_bytes(shamir.to_bytes(PRIME))
    with pytest.raises(ValueError, match="distinct and nonzero"):
        shamir.split(1, [0, 1], 2)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(1, [1, 2], 3)
    with pytest.raises(ValueError, match="field"):
        shamir.split(PRIME, [1, 2], 2)


@settings(max_examples=25, deadline=None)
@given(
    secret=st.integers(0, 2**256 - 1),
    t=st.integers(1, 8),
    extra=st.integers(0, 5),
    data=st.data(),
)
def test_any_t_of_n_shares_reconstruct(secret, t, extra, data):
    xs = data.draw(st.lists(st.integers(1, 2**32), min_size=t + extra, max_size=t + extra, unique=True))
    shares = shamir.split(secret, xs, t)
    chosen = data.draw(st.permutations(sorted(shares.items())))[:t]
    assert shamir.reconstruct(chosen) == secret
