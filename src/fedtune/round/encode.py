"""A client's update pipeline, in one place and one order:

    error feedback -> clip -> compress -> quantize -> (secure aggregation) fixed point -> noise share -> mask

Each stage is a small function that returns what it computes (`add_residual`, `clip_to`, `compress`,
`to_bytes`, `fixedpoint.encode`, `add_noise_to_payload`, the SecAgg+ client's `masked_input`);
`encode_update` runs them in that order and hands back what leaves the client, whether the update fit
under the clip, and the client's next error-feedback residual.

Why this order. The residual is added before the clip, so the clip bounds every vector that leaves the
client: that is the per-round sensitivity a DP accountant assumes (adding it after would let a client
send up to clip + |residual|, a residual that carries earlier rounds' data). The residual is what the
compression dropped of the clipped vector, so the clip's loss is not fed back. Under secure aggregation
the kept values are fixed-point encoded with the client's weight; a distributed-DP noise share is integer
noise, so it joins the fixed-point words, and the mask comes last, over everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.compress import CompressionSpec, add_residual, compress, next_residual, to_bytes
from fedtune.privacy.clip import clip_l2
from fedtune.privacy.distributed import add_noise_to_payload
from fedtune.round.messages import CompressedUpdate, DenseUpdate, MaskedUpdate, Update
from fedtune.secagg.fixedpoint import FixedPoint, UniformSource
from fedtune.secagg.fixedpoint import encode as fixed_point


@dataclass(frozen=True, eq=False)
class Masking:
    """Secure aggregation's stages on the client: the public encoding, the client's weight, its rounding
    stream, its noise share (distributed DP) and the mask (the SecAgg+ client's stage-2 step)."""

    encoding: FixedPoint
    weight: int
    rounding: UniformSource
    mask: Callable[[np.ndarray], np.ndarray]  # encoded payload words -> masked words
    noise_share: np.ndarray | None = None  # int64, one per value word


@dataclass(frozen=True, eq=False)
class Encoded:
    update: Update
    fits_clip: bool  # the update (with its residual) was within the clip norm, or there was none
    residual: torch.Tensor | None  # the next error-feedback residual; None without error feedback


def clip_to(update: torch.Tensor, clip_l2_norm: float | None) -> tuple[torch.Tensor, bool]:
    """The update clipped to `clip_l2_norm` (None: as it is), and whether it fit under it."""
    if clip_l2_norm is None:
        return update, True
    clipped = clip_l2(update, clip_l2_norm)
    return clipped.delta, not clipped.clipped


def encode_update(
    delta: torch.Tensor,
    spec: CompressionSpec,
    *,
    generator: torch.Generator,
    residual: torch.Tensor | None = None,
    clip_l2_norm: float | None = None,
    shared_seed: bytes | None = None,
    masking: Masking | None = None,
) -> Encoded:
    """Encode one client's delta. `generator` drives stochastic quantization; `shared_seed` is the round's
    random-k seed; `masking` (secure aggregation) turns the kept values into masked words."""
    if masking is not None and (spec.method == "topk" or spec.quantizes):
        raise ValueError("a mask stage needs unquantized values on shared coordinates; see check_composable")
    ef = spec.uses_error_feedback
    corrected = add_residual(delta, residual) if ef else delta
    clipped, fits = clip_to(corrected, clip_l2_norm)
    if spec.method == "none" and masking is None:
        return Encoded(DenseUpdate(clipped), fits, None)  # the delta travels as it is
    payload = compress(clipped, spec, generator=generator, shared_seed=shared_seed)  # with quantize
    new_residual = next_residual(clipped, payload.to_dense()) if ef else None
    if masking is None:
        return Encoded(
            CompressedUpdate(to_bytes(payload, entropy_coding=spec.entropy_coding)), fits, new_residual
        )
    values = payload.decoded_values().numpy().astype(np.float32, copy=False)
    words = fixed_point(values, masking.weight, masking.encoding, masking.rounding)
    if masking.noise_share is not None:
        words = add_noise_to_payload(words, masking.noise_share)
    return Encoded(MaskedUpdate(masking.mask(words)), fits, new_residual)
