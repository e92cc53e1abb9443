"""Distributed DP under secure aggregation: each client adds a Skellam share to its integer-encoded update.

The order on a client is clip (L2 norm C) -> encode (`secagg.fixedpoint.encode`, weight 1) -> add this
client's Skellam share to the m value words -> mask. The server unmasks only the sum, which already holds
the whole noise, so the guarantee holds against the server too (up to amplification by sampling, which
needs a cohort the server does not know: see `accountant.py`). Weights must be 1 in a DP round: with
example weights one client could move the sum by max_weight times C.

Integer domain: a real value x becomes q = round((x + c) / step) with c = clip_range and
step = 2c / (2^bits - 1), stochastic rounding. One client's vector q - (L/2) has L2 norm at most
C / step + sqrt(d): the scaled clipped delta plus a rounding error below 1 per coordinate (the deterministic
bound of Kairouz et al. 2021, Theorem 1 with beta = 0; no conditional rounding, no random rotation).
Per-coordinate clipping to [-c, c] only shrinks the vector, so it keeps the bound. The noise
multiplier z keeps its central meaning: the total noise std is z * C / step in integer units, i.e.
z * C on the real sum; each of at least `min_contributors` clients adds variance (z * C / step)^2 /
min_contributors. A round with fewer contributors (dropouts) has less noise, and must be accounted with
what it had (`mechanism(contributors)`).

The noise pushes words below 0 or above n * L, so the sum is decoded centred: the uint32 sum is read as
the signed integer nearest to its expected centre W * L / 2 (W = the noiseless count of contributors),
which is exact while |noise| + W * L / 2 < 2^31: `check_headroom` refuses settings where 8 standard
deviations of noise could wrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtune.errors import ConfigError
from fedtune.privacy.accountant import SkellamRound
from fedtune.privacy.noise import client_share_variance, skellam
from fedtune.secagg.fixedpoint import MODULUS_BITS, FixedPoint
from fedtune.secagg.prg import WORD

_MODULUS = 2**MODULUS_BITS
_HALF = 2 ** (MODULUS_BITS - 1)


@dataclass(frozen=True)
class DistributedNoise:
    """The public plan of a run's distributed Skellam noise, in secure aggregation's integer domain."""

    clip_l2_norm: float
    noise_multiplier: float
    step: float  # the encoding's quantization step, `FixedPoint.step`
    dim: int  # values per update
    min_contributors: int  # the noise reaches its target with this many contributing clients

    def __post_init__(self) -> None:
        for name in ("clip_l2_norm", "noise_multiplier", "step"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if self.dim < 1 or self.min_contributors < 1:
            raise ValueError("dim and min_contributors must be at least 1")

    @property
    def l2_sensitivity(self) -> float:
        """One client's integer L2 bound (add/remove): scaled clip plus the rounding error."""
        return self.clip_l2_norm / self.step + math.sqrt(self.dim)

    @property
    def total_variance(self) -> float:
        """The integer-domain variance per coordinate of the noise in a sum of `min_contributors` shares."""
        return (self.noise_multiplier * self.clip_l2_norm / self.step) ** 2

    @property
    def client_variance(self) -> float:
        return client_share_variance(self.total_variance, self.min_contributors)

    def share(self, rng: np.random.Generator) -> np.ndarray:
        """One client's Skellam share: `dim` int64 values, drawn from an OS-entropy generator."""
        return skellam(self.dim, self.client_variance, rng)

    def mechanism(self, contributors: int) -> SkellamRound:
        """What a round with `contributors` shares in its sum released, for the accountant."""
        if contributors < 1:
            raise ValueError("a released sum has at least one contributor")
        return SkellamRound(self.client_variance * contributors, self.l2_sensitivity, self.dim)

    def real_std(self, contributors: int) -> float:
        """The noise std on the decoded real-valued sum, for logs."""
        return math.sqrt(self.client_variance * contributors) * self.step


def add_noise_to_payload(payload: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Add integer `noise` to the first len(noise) words of an encoded payload, mod 2^32 (a new array).
    The last two words (weight and clip count) are left as they are."""
    if (
        payload.dtype != WORD
        or payload.ndim != 1
        or noise.ndim != 1
        or noise.shape[0] != payload.shape[0] - 2
    ):
        raise ValueError("noise must have one int value per payload value word (the payload minus 2 words)")
    out = payload.copy()
    values = out[:-2].astype(np.int64)
    values += noise.astype(np.int64)
    np.mod(values, _MODULUS, out=values)
    out[:-2] = values.astype(WORD)
    return out


@dataclass(frozen=True)
class NoisedSum:
    """The decoded, noised sum of the contributors' clipped deltas, in real units, and their count."""

    total: np.ndarray  # float64
    contributors: int


def decode_noised_sum(words: np.ndarray, spec: FixedPoint) -> NoisedSum:
    """Decode an unmasked sum of weight-1 payloads carrying Skellam noise: centred, so noise may wrap."""
    if words.dtype != WORD or words.ndim != 1 or words.shape[0] < 3:
        raise ValueError("a payload sum is a 1-d uint32 array of m + 2 words")
    contributors = int(words[-2])
    if contributors == 0:
        raise ValueError("the payload sum has no contributor in it")
    centre = contributors * spec.levels // 2
    s = words[:-2].astype(np.int64) - centre
    s = np.mod(s + _HALF, _MODULUS) - _HALF + centre  # the representative nearest the centre
    total = s.astype(np.float64) * spec.step - contributors * spec.clip_range
    return NoisedSum(total, contributors)


def check_headroom(max_clients: int, spec: FixedPoint, plan: DistributedNoise, sigmas: float = 8.0) -> None:
    """Refuse (ConfigError) settings whose noised sum could wrap the 2^32 modulus."""
    std = math.sqrt(plan.client_variance * max_clients)
    worst = max_clients * spec.levels / 2 + sigmas * std
    if worst < _HALF:
        return
    raise ConfigError(
        f"secure_aggregation.bits = {spec.bits} leaves no room for the distributed noise: {max_clients} "
        f"clients x (2^{spec.bits} - 1) / 2 + {sigmas:g} x noise std {std:.3g} = {worst:.3g} >= 2^31; "
        "lower secure_aggregation.bits or privacy.noise_multiplier, or raise secure_aggregation.clip_range"
    )
