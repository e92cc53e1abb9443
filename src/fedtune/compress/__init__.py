"""Update compression: sparsify, quantize and entropy-code a client's delta, with error feedback.

Files follow the encoding of an update: `pipeline` orders the stages (clip -> noise -> compress ->
quantize -> mask) and refuses combinations that do not compose; `sparsify` (top-k, random-k from a shared
seed), `quantize` (unbiased stochastic rounding to 1..8 bits, per block or tensor), `error_feedback` (the
residual each client keeps), `entropy` (zstd where it pays) and `payload` (the self-describing wire format
whose length is the round's bytes up). Every random draw comes from a generator or seed passed in.
"""

from fedtune.compress.error_feedback import ResidualStore, add_residual, next_residual, with_error_feedback
from fedtune.compress.errors import PayloadError
from fedtune.compress.payload import Method, Payload, ValueFormat, decode, parse, to_bytes
from fedtune.compress.pipeline import (
    CompressionSettings,
    CompressionSpec,
    EncodedUpdate,
    Mask,
    Transform,
    UpdateEncoder,
    check_composable,
    compress,
    scatter_shared,
)
from fedtune.compress.quantize import Quantized, dequantize, quantize
from fedtune.compress.sparsify import num_kept, randomk_indices, topk_indices

__all__ = [
    "CompressionSettings",
    "CompressionSpec",
    "EncodedUpdate",
    "Mask",
    "Method",
    "Payload",
    "PayloadError",
    "Quantized",
    "ResidualStore",
    "Transform",
    "UpdateEncoder",
    "ValueFormat",
    "add_residual",
    "check_composable",
    "compress",
    "decode",
    "dequantize",
    "next_residual",
    "num_kept",
    "parse",
    "quantize",
    "randomk_indices",
    "scatter_shared",
    "to_bytes",
    "topk_indices",
    "with_error_feedback",
]
