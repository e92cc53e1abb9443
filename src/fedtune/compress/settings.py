"""The `[compression]` config section: how clients compress their updates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.section import PositiveInt, Section


class CompressionConfig(Section):
    """How clients compress their updates (fedtune.compress): sparsify, quantize, entropy-code."""

    method: Literal["none", "quantize", "topk", "randomk"] = "none"
    bits: int = Field(8, ge=1, le=32)  # quantize: 1-8; topk/randomk values: 32, 16 or 1-8
    block_size: PositiveInt | Literal["tensor"] = 256  # values per quantization scale
    fraction: float = Field(0.01, gt=0.0, le=1.0)  # topk/randomk: share of coordinates kept
    error_feedback: bool = True  # each client keeps what compression dropped and adds it next time
    entropy_coding: bool = True  # zstd per payload section, only where it is smaller
    rescale: bool = False  # randomk: the server scales by d/k (unbiased); not with error_feedback
