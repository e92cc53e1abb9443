"""The public parameters of one secure aggregation round, shared by the server and every client.

Validated once: a threshold below 2 would hand a client's secrets to any single neighbour, and one above
k + 1 (the neighbours plus the client itself hold its shares) could never be met. `default_threshold` is a
strict majority of the k + 1 holders.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.errors import ConfigError
from fedtune.secagg.fixedpoint import FixedPoint, payload_words


def default_threshold(neighbours: int) -> int:
    """t = floor((k + 1) / 2) + 1: a strict majority of the k + 1 holders of each client's shares."""
    return (neighbours + 1) // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """Round id, vector size, threshold t, neighbours k (before the graph's adjustment) and the encoding."""

    round_id: int
    vector_size: int
    threshold: int
    neighbours: int
    encoding: FixedPoint

    def __post_init__(self) -> None:
        if not 0 <= self.round_id < 2**64:
            raise ValueError(f"round id {self.round_id} must fit in 64 bits")
        if self.vector_size < 1:
            raise ValueError("the update vector must not be empty")
        if self.neighbours < 1:
            raise ConfigError(f"secure_aggregation.neighbours = {self.neighbours}; it must be at least 1")
        if not 2 <= self.threshold <= self.neighbours + 1:
            raise ConfigError(
                f"secure_aggregation.threshold = {self.threshold}; allowed: 2 to neighbours + 1 = "
                f"{self.neighbours + 1} (each client's shares are held by its neighbours and itself)"
            )

    @property
    def payload_words(self) -> int:
        return payload_words(self.vector_size)
