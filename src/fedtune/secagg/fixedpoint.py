"""Fixed-point encoding of weighted updates into integers mod 2^32, with stochastic rounding.

A value x is clipped to [-c, c] (c = clip_range), mapped onto [0, L] with L = 2^bits - 1, and rounded up
with probability equal to its fractional part: unbiased, and off by less than one step (2c / L). A client's
payload is m + 2 words: its quantized update times its integer weight w (its number of training examples),
then w, then how many of its values were clipped. Summed over clients these give sum w_u q_u, the total
weight W and the total clip count, so the weighted sum decodes as (sum w_u q_u) * step - W * c while no
client's weight or clip count is revealed on its own. `decode` gives the sum; the round engine divides.

The sum must stay below the 2^32 modulus: n * max_weight * L < 2^32. `check_overflow` refuses anything
else, naming the fields and the fix. Out-of-range values are clipped and counted, never wrapped;
non-finite values are refused. The rounding noise is an argument (`UniformSource`, e.g. a numpy Generator
created by the caller): it is not secret, and passing it keeps a seeded simulation reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedtune.errors import ConfigError
from fedtune.secagg.prg import WORD

MODULUS_BITS = 32
_MODULUS = 2**MODULUS_BITS


class UniformSource(Protocol):
    """Draws floats uniform in [0, 1), like numpy's `Generator.random(size)`."""

    def random(self, size: int) -> np.ndarray: ...


def max_bits(num_clients: int, max_weight: int) -> int:
    """The most quantization bits that cannot overflow with `num_clients` weights up to `max_weight`."""
    bits = 0
    while bits < MODULUS_BITS - 1 and num_clients * max_weight * (2 ** (bits + 1) - 1) < _MODULUS:
        bits += 1
    return bits


def check_overflow(num_clients: int, max_weight: int, bits: int, clip_range: float) -> None:
    """Refuse (ConfigError) any setting whose sum of weighted encoded updates could wrap mod 2^32."""
    if not 1 <= bits < MODULUS_BITS:
        raise ConfigError(f"secure_aggregation.bits = {bits}; allowed: 1 to {MODULUS_BITS - 1}")
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ConfigError(f"secure_aggregation.clip_range = {clip_range}; it must be a positive number")
    if num_clients < 1 or max_weight < 1:
        raise ValueError("the number of clients and the largest weight must be positive")
    worst = num_clients * max_weight * (2**bits - 1)
    if worst < _MODULUS:
        return
    best = max_bits(num_clients, max_weight)
    if best >= 1:
        step = 2 * clip_range / (2**best - 1)
        fix = (
            f"lower secure_aggregation.bits to {best} or less (a quantization step of "
            f"2 * secure_aggregation.clip_range / (2^{best} - 1) = {step:.3g}), or use fewer clients per "
            "round or a smaller largest weight (data.max_examples_per_client)"
        )
    else:
        fix = "use fewer clients per round or a smaller largest weight (data.max_examples_per_client)"
    raise ConfigError(
        f"secure_aggregation.bits = {bits} could overflow the 2^{MODULUS_BITS} modulus: {num_clients} "
        f"clients x weight up to {max_weight} x (2^{bits} - 1) = {worst} >= 2^{MODULUS_BITS}; {fix}"
    )


@dataclass(frozen=True)
class FixedPoint:
    """The public encoding of a round: validated so that `max_clients` payloads never overflow."""

    bits: int
    clip_range: float
    max_weight: int = 1
    max_clients: int = 1

    def __post_init__(self) -> None:
        check_overflow(self.max_clients, self.max_weight, self.bits, self.clip_range)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        """The quantization step: the decoded mean is within one step of the mean of clipped inputs."""
        return 2 * self.clip_range / self.levels

    @property
    def max_clip_count(self) -> int:
        """Per-client cap on the reported clip count, so that the count word cannot overflow either."""
        return (_MODULUS - 1) // self.max_clients


def payload_words(vector_size: int) -> int:
    return vector_size + 2


def quantize(values: np.ndarray, spec: FixedPoint, rng: UniformSource) -> tuple[np.ndarray, int]:
    """(q, clipped): values clipped to [-c, c], stochastically rounded onto 0..L as uint32."""
    x = np.asarray(values)
    if x.ndim != 1:
        raise ValueError(f"an update must be a 1-d vector, got shape {x.shape}")
    if not np.isfinite(x.sum()) and not np.isfinite(x).all():  # the cheap sum first; overflow falls back
        raise ValueError("the update has non-finite values; refuse it before secure aggregation")
    c = spec.clip_range
    clipped = int(np.count_nonzero(x > c) + np.count_nonzero(x < -c))
    levels = spec.levels
    y = np.multiply(x, levels / (2 * c), dtype=np.float64)  # one pass: widen and scale
    y += levels / 2  # [-c, c] -> [0, L]
    np.clip(y, 0.0, levels, out=y)
    y += rng.random(x.shape[0])  # floor(y + u) rounds up with probability frac(y)
    q = y.astype(WORD)  # truncation is floor here, y >= 0
    np.minimum(q, levels, out=q)  # L + u may round to L + 1 in floating point
    return q, clipped


def encode(delta: np.ndarray, weight: int, spec: FixedPoint, rng: UniformSource) -> np.ndarray:
    """A client's payload: [w * q(delta)..., w, clipped count], uint32, m + 2 words."""
    if weight != int(weight) or not 1 <= weight <= spec.max_weight:
        raise ValueError(
            f"a weight must be an integer from 1 to max_weight = {spec.max_weight}, got {weight}"
        )
    q, clipped = quantize(delta, spec, rng)
    payload = np.empty(payload_words(q.shape[0]), dtype=WORD)
    np.multiply(q, int(weight), out=payload[:-2])
    payload[-2] = int(weight)
    payload[-1] = min(clipped, spec.max_clip_count)
    return payload


@dataclass(frozen=True)
class DecodedSum:
    """The summed payloads decoded: sum_u w_u x_u (float64, each x_u clipped and rounded to the step), the
    total weight W and the total clip count."""

    total: np.ndarray
    total_weight: int
    clipped: int

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean, float32."""
        return (self.total / self.total_weight).astype(np.float32)


def decode(total: np.ndarray, spec: FixedPoint) -> DecodedSum:
    """Decode the (unmasked) sum of payloads: sum_u w_u x_u = (sum_u w_u q_u) * step - W * c."""
    if total.dtype != WORD or total.ndim != 1 or total.shape[0] < 3:
        raise ValueError("a payload sum is a 1-d uint32 array of m + 2 words")
    weight = int(total[-2])
    if weight == 0:
        raise ValueError("the payload sum has total weight 0: no client update is in it")
    values = total[:-2].astype(np.float64)
    values *= spec.step
    values -= weight * spec.clip_range
    return DecodedSum(values, weight, int(total[-1]))
