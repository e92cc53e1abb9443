"""Clipping a client's delta to an L2 norm: the step that bounds one client's influence on the sum.

The norm is computed in float64 after dividing by the largest magnitude, so a delta of float32 values near
3.4e38 (or float64 values near 1.8e308) neither overflows nor loses the result to Inf. The clipped delta is
`delta * (C / norm)` cast back to the input dtype; rounding in that cast can raise the norm by half a unit
in the last place, so the result is checked and, while it lands above C (less a margin for the float64
norm's own rounding), scaled down by a few units more: the bound `norm(clipped) <= C` holds exactly, in the
dtype the caller gets back, which is what the privacy accounting assumes. NaN or Inf values raise
`NonFiniteUpdate`; the caller refuses that update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.privacy.errors import NonFiniteUpdate


@dataclass(frozen=True)
class ClipResult:
    """The clipped delta, the norm it had before clipping, and whether it was scaled down."""

    delta: torch.Tensor
    norm: float  # L2 norm before clipping (float64 arithmetic; Inf only for float64 input near its max)
    clipped: bool


def l2_norm(values: torch.Tensor) -> float:
    """The L2 norm in float64, scaled by the largest magnitude first: no overflow, no underflow to 0."""
    x = values.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        return 0.0
    peak = float(x.abs().max())
    if not math.isfinite(peak):
        raise NonFiniteUpdate("the delta has NaN or Inf values; refuse the update")
    if peak == 0.0:
        return 0.0
    return peak * float(torch.linalg.vector_norm(x / peak))


def clip_l2(delta: torch.Tensor, clip_l2_norm: float) -> ClipResult:
    """Scale `delta` down to L2 norm `clip_l2_norm` if it is longer; raises `NonFiniteUpdate` on NaN/Inf."""
    if not (math.isfinite(clip_l2_norm) and clip_l2_norm > 0):
        raise ValueError(f"clip_l2_norm must be a positive finite number, got {clip_l2_norm}")
    if not delta.is_floating_point():
        raise TypeError(f"a delta is a floating-point tensor, got {delta.dtype}")
    norm = l2_norm(delta)  # raises on NaN/Inf
    if norm <= clip_l2_norm:
        return ClipResult(delta, norm, clipped=False)
    x = delta.detach().to(torch.float64)
    peak = float(x.abs().max())
    unit = x / peak  # every value in [-1, 1]: its norm is finite even when `norm` overflowed
    scale = clip_l2_norm / float(torch.linalg.vector_norm(unit))
    shrink = 1.0 - 4 * torch.finfo(delta.dtype).eps  # a few units in the last place of the output dtype
    # the float64 norm itself may be off by about n units in the last place: demand that much below C
    limit = clip_l2_norm * (1.0 - (delta.numel() + 2) * 2.0**-53)
    out = (unit * scale).to(delta.dtype)
    while l2_norm(out) > limit:  # the cast rounded up; subnormal outputs may take a few turns
        scale *= shrink
        shrink *= shrink
        out = (unit * scale).to(delta.dtype)
    return ClipResult(out, norm, clipped=True)
