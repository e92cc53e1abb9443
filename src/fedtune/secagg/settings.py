"""The `[secure_aggregation]` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.section import PositiveInt, Section


class SecureAggregationConfig(Section):
    """SecAgg+ (Bell et al. 2020): the server learns only the sum of the round's masked updates."""

    enabled: bool = False
    neighbours: PositiveInt | Literal["auto", "all"] = "auto"  # auto: 2*ceil(log2 n); all: SecAgg
    threshold: PositiveInt | Literal["auto"] = "auto"  # auto: a strict majority of each k + 1 holders
    bits: int = Field(16, ge=1, le=31)  # fixed-point bits per value, before weighting
    clip_range: float = Field(0.1, gt=0.0)  # each delta coordinate is clipped to [-c, c]
    dropout_rate: float = Field(0.0, ge=0.0, lt=1.0)  # simulation: chance a client drops at each stage
