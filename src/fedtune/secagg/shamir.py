"""t-of-n Shamir secret sharing over the prime field of the Mersenne prime 2^521 - 1, in plain Python ints.

The field is far larger than the 256-bit secrets shared here (mask seeds and X25519 private keys), so a
secret is an element of the field as is. A share is the point (x, f(x)) of a random polynomial f of degree
t - 1 with f(0) = the secret; x is the holder's client id + 1 (never 0). Coefficients come from `secrets`
unless given (for known-answer tests). Reconstruction is Lagrange interpolation at 0 over exactly the shares
passed: give it t; with fewer it returns an unrelated field element, never an error, as Shamir must.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """f(x) mod PRIME for f = coefficients[0] + coefficients[1] x + ... (Horner's rule)."""
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value


def split(
    secret: int, xs: Sequence[int], threshold: int, *, coefficients: Sequence[int] | None = None
) -> dict[int, int]:
    """Shares {x: f(x)} of `secret` at the points `xs`; any `threshold` of them reconstruct it.

    `coefficients` (degree 1 and up, `threshold - 1` of them) default to uniform draws from `secrets`.
    """
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must be an element of the field [0, 2^521 - 1)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if coefficients is None:
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise ValueError(f"a {threshold}-of-n sharing needs {threshold - 1} coefficients")
    poly = [secret, *coefficients]
    return {x: evaluate(poly, x) for x in xs}


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Lagrange basis values at 0: l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod PRIME."""
    return list(_lagrange_at_zero(tuple(xs)))


@lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # Cached: with all pairs, the server interpolates every secret at the same t points.
    if len(set(xs)) != len(xs):
        raise ValueError("interpolation points must be distinct")
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def reconstruct(shares: Mapping[int, int] | Sequence[tuple[int, int]]) -> int:
    """f(0) from the points given; pass exactly t shares of a t-of-n sharing."""
    points = list(shares.items()) if isinstance(shares, Mapping) else list(shares)
    if not points:
        raise ValueError("no shares to reconstruct from")
    weights = _lagrange_at_zero(tuple(x for x, _ in points))
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


def to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(raw: bytes) -> int:
    value = int.from_bytes(raw, "big")
    if len(raw) != SHARE_BYTES or value >= PRIME:
        raise ValueError("not a field element")
    return value
