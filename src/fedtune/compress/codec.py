"""The compress and quantize stages of a client's update, their spec, and what composes with them.

`compress` sparsifies (top-k, random-k) and quantizes what it keeps, into a `Payload`; `scatter_shared`
puts a securely summed random-k vector back on its coordinates. The order of a client's whole pipeline
(error feedback -> clip -> compress -> quantize -> fixed point -> noise share -> mask) lives in one place,
`fedtune.round.encode`; this module is its compression half.

`check_composable` refuses, at config load, the combinations whose stages do not compose, naming the
config fields and the fix; `CompressionSpec` checks each field on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import torch

from fedtune.compress.payload import Method, Payload
from fedtune.compress.quantize import MAX_BITS, Quantized, quantize
from fedtune.compress.settings import CompressionConfig
from fedtune.compress.sparsify import densify, num_kept, randomk_indices, topk_indices
from fedtune.errors import ConfigError

CompressionMethod = Literal["none", "quantize", "topk", "randomk"]
FLOAT16_MAX = 65504.0
# rules that compare the clients' updates coordinate by coordinate or by their distances: with top-k each
# client sends its own coordinates, and they would compare zeros that were never sent (norm_bound and
# fltrust judge each update on its own, by its norm or its direction against the server's)
_RULES_OVER_EACH_UPDATE = (
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "centered_clip",
)


@dataclass(frozen=True)
class CompressionSpec:
    """How a client compresses its update; mirrors the config's `[compression]` section.

    `bits`: for `quantize`, 1 to 8; for `topk` and `randomk`, how the kept values travel: 32 (float32),
    16 (float16) or 1 to 8 (quantized). `block_size`: values per quantization scale, None for one per
    tensor. `fraction`: the share of coordinates `topk`/`randomk` keep. `rescale`: random-k only, the
    server multiplies by d/k so the update is unbiased (not with error feedback).
    """

    method: CompressionMethod = "none"
    bits: int = 8
    block_size: int | None = 256
    fraction: float = 0.01
    error_feedback: bool = True
    entropy_coding: bool = True
    rescale: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("none", "quantize", "topk", "randomk"):
            raise ConfigError(
                f"compression.method = {self.method!r}; allowed: 'none', 'quantize', 'topk', 'randomk'"
            )
        if self.method == "quantize" and not 1 <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"compression.bits = {self.bits} with method 'quantize'; allowed: 1 to {MAX_BITS}"
            )
        if self.sparse and not (1 <= self.bits <= MAX_BITS or self.bits in (16, 32)):
            raise ConfigError(
                f"compression.bits = {self.bits} with method {self.method!r}; allowed: 32 (float32 values), "
                f"16 (float16) or 1 to {MAX_BITS} (quantized)"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"compression.block_size = {self.block_size}; it must be at least 1")
        if not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"compression.fraction = {self.fraction}; allowed: more than 0, at most 1")
        if self.rescale and self.method != "randomk":
            raise ConfigError(
                f"compression.rescale = true applies to method 'randomk' only, not {self.method!r}"
            )
        if self.rescale and self.error_feedback:
            raise ConfigError(
                "compression.rescale = true with compression.error_feedback = true: the rescaled update is "
                "already unbiased, and the residual would carry -(d/k - 1) times every value sent; choose one"
            )

    @classmethod
    def from_config(cls, section: CompressionConfig) -> CompressionSpec:
        """From the config's `[compression]` section; `block_size = "tensor"` is one scale per tensor."""
        block = section.block_size
        return cls(
            method=cast(CompressionMethod, section.method),  # checked in __post_init__
            bits=section.bits,
            block_size=None if block == "tensor" else int(block),
            fraction=section.fraction,
            error_feedback=section.error_feedback,
            entropy_coding=section.entropy_coding,
            rescale=section.rescale,
        )

    @property
    def sparse(self) -> bool:
        return self.method in ("topk", "randomk")

    @property
    def quantizes(self) -> bool:
        return self.method == "quantize" or (self.sparse and self.bits <= MAX_BITS)

    @property
    def uses_error_feedback(self) -> bool:
        """Error feedback with nothing lost (method 'none') would only store zeros."""
        return self.error_feedback and self.method != "none"


def compress(
    update: torch.Tensor,
    spec: CompressionSpec,
    *,
    generator: torch.Generator,
    shared_seed: bytes | None = None,
) -> Payload:
    """Sparsify (top-k, random-k), then quantize what is kept: the compress and quantize stages."""
    if update.ndim != 1:
        raise ValueError(f"an update is a 1-d vector, got shape {tuple(update.shape)}")
    update = update.detach().to(torch.float32)
    numel = update.shape[0]
    if spec.method == "none":
        return Payload(Method.DENSE, numel, update.numpy())
    if spec.method == "quantize":
        return Payload(Method.DENSE, numel, quantize(update, spec.bits, spec.block_size, generator))
    k = num_kept(numel, spec.fraction)
    if spec.method == "topk":
        indices = topk_indices(update, k)
        return Payload(Method.TOPK, numel, _values(update[indices], spec, generator), indices)
    if shared_seed is None:
        raise ValueError("random-k needs the round's shared seed")
    indices = randomk_indices(shared_seed, numel, k)
    values = _values(update[indices], spec, generator)
    return Payload(Method.RANDOMK, numel, values, seed=shared_seed, rescale=spec.rescale)


def _values(kept: torch.Tensor, spec: CompressionSpec, generator: torch.Generator) -> np.ndarray | Quantized:
    if spec.bits <= MAX_BITS:
        return quantize(kept, spec.bits, spec.block_size, generator)
    if spec.bits == 16 and (kept.numel() == 0 or float(kept.abs().max()) <= FLOAT16_MAX):
        return kept.numpy().astype(np.float16)
    return kept.numpy()  # float32, or float16 asked for but out of its range


def scatter_shared(
    values: torch.Tensor, numel: int, spec: CompressionSpec, shared_seed: bytes
) -> torch.Tensor:
    """Server side under secure aggregation: the (mean of the) random-k values, back on their coordinates."""
    if spec.method != "randomk":
        raise ValueError(f"scatter_shared is for random-k updates, not {spec.method!r}")
    k = num_kept(numel, spec.fraction)
    if values.shape != (k,):
        raise ValueError(f"expected the {k} random-k values, got shape {tuple(values.shape)}")
    scale = numel / k if spec.rescale else 1.0
    return densify(randomk_indices(shared_seed, numel, k), values, numel, scale)


def check_composable(
    spec: CompressionSpec,
    *,
    secure_aggregation: bool = False,
    server_rule: str = "fedavg",
    privacy_mode: str = "off",
) -> list[str]:
    """Refuse (ConfigError) what does not compose with the other stages; return notes on what composes
    with a caveat, for the run's log. `privacy_mode` is `privacy.mode`: off, central or distributed."""
    method = spec.method
    if secure_aggregation and method == "topk":
        raise ConfigError(
            "compression.method = 'topk' cannot run with secure_aggregation.enabled = true: pairwise masks "
            "cancel only when every client masks the same coordinates, and top-k picks each client's own "
            "(sending them would also reveal them); use compression.method = 'randomk', whose coordinates "
            "come from a seed shared by the round"
        )
    if secure_aggregation and spec.quantizes:
        raise ConfigError(
            f"compression.bits = {spec.bits} (method {method!r}) cannot run with secure_aggregation.enabled "
            "= true: secure aggregation fixed-point encodes every value itself (secure_aggregation.bits), "
            "and per-client quantization scales cannot be summed under masks; use compression.method = "
            "'none' or 'randomk' with compression.bits = 32 and set secure_aggregation.bits instead"
        )
    if secure_aggregation and method == "randomk" and spec.bits != 32:
        raise ConfigError(
            f"compression.bits = {spec.bits} with secure_aggregation.enabled = true: the random-k values "
            "are fixed-point encoded by secure aggregation (secure_aggregation.bits); set compression.bits "
            "= 32"
        )
    if method == "topk" and server_rule in _RULES_OVER_EACH_UPDATE:
        raise ConfigError(
            f"server.rule = {server_rule!r} compares the clients' updates coordinate by coordinate or by "
            "their distances, and with compression.method = 'topk' each client sends its own coordinates, "
            "so on most coordinates the rule compares zeros that were never sent; use server.rule = "
            "'fedavg', 'norm_bound' or 'fltrust', or compression.method = 'randomk' (the same coordinates "
            "for every client)"
        )
    if spec.rescale and privacy_mode == "central":
        raise ConfigError(
            "compression.rescale = true with privacy.mode = 'central': the server multiplies each update "
            "by d/k before adding the noise, so one client moves the noised sum by up to d/k times "
            "privacy.clip_l2_norm, not the clip norm the accountant assumes; set compression.rescale = "
            "false (and use compression.error_feedback)"
        )
    notes = []
    if secure_aggregation:
        notes.append(
            "secure aggregation sends one 32-bit masked word per value whatever secure_aggregation.bits, "
            "so only compression.method = 'randomk' cuts its bytes up; masked words are uniformly random, "
            "so compression.entropy_coding has nothing to gain there"
        )
        if spec.uses_error_feedback:
            notes.append(
                "compression.error_feedback under secure aggregation: a client's residual is updated when "
                "it masks its values, so a client that drops after that loses what its residual held"
            )
    if privacy_mode != "off" and spec.uses_error_feedback:
        notes.append(
            f"compression.error_feedback with privacy.mode = {privacy_mode!r}: the residual is added before "
            "the clip, so every vector a client sends is within privacy.clip_l2_norm (the sensitivity the "
            "accountant assumes)"
            + (
                "; stochastic quantization can raise a sent vector's L2 norm by up to one step per value "
                "(step * sqrt(values sent)), so clip a little below the accounted norm"
                if spec.quantizes
                else ""
            )
        )
    return notes
