"""Update compression: sparsify, quantize and entropy-code a client's delta, with error feedback.

Files follow the encoding of an update: `codec` (the compress and quantize stages, their spec, and the
combinations that do not compose), `sparsify` (top-k, random-k from a shared seed), `quantize` (unbiased
stochastic rounding to 1..8 bits, per block or tensor), `error_feedback` (the residual arithmetic),
`entropy` (zstd where it pays), `payload` (the self-describing wire format whose length is the round's
bytes up) and `settings` (the `[compression]` section). The client's whole pipeline, in order, is
`fedtune.round.encode`. Every random draw comes from a generator or seed passed in.
"""

from fedtune.compress.codec import CompressionSpec, check_composable, compress, scatter_shared
from fedtune.compress.error_feedback import add_residual, next_residual
from fedtune.compress.errors import PayloadError
from fedtune.compress.payload import Method, Payload, ValueFormat, decode, parse, to_bytes
from fedtune.compress.quantize import Quantized, dequantize, quantize
from fedtune.compress.settings import CompressionConfig
from fedtune.compress.sparsify import num_kept, randomk_indices, topk_indices

__all__ = [
    "CompressionConfig",
    "CompressionSpec",
    "Method",
    "Payload",
    "PayloadError",
    "Quantized",
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
]
