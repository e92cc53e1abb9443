"""How a round's client deltas become one aggregated delta: in the clear, or through secure aggregation.

A collector is made per round and has one shape whatever the protocol: `admitted` (the cohort slots that
may train: secure aggregation exchanges keys first, and a client that drops then never trains), `submit`
(one client's delta and weight, as soon as it has trained), `finish` (the aggregated delta, or None when
nothing could be aggregated, with the round's bytes and protocol metrics). The server optimizer is applied
by the caller, so any collector composes with any optimizer, in simulation now and over a transport later.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedtune.aggregate import Aggregator
from fedtune.config import SecureAggregationConfig
from fedtune.secagg import SecAggAbort, SecAggRound, Stage

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Collected:
    """A round's outcome: the aggregated delta (None if the round applied nothing) and what it cost."""

    delta: torch.Tensor | None
    clients: int  # updates inside the aggregate
    bytes_up: int
    bytes_down: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Collector(Protocol):
    @property
    def admitted(self) -> Collection[int]: ...
    def submit(self, slot: int, delta: torch.Tensor, weight: int) -> None: ...
    def finish(self) -> Collected: ...


class PlainCollector:
    """Deltas in the clear into the aggregator's rule (streaming for FedAvg)."""

    def __init__(self, aggregator: Aggregator, cohort: int, adapter_numel: int) -> None:
        self.aggregator = aggregator
        self.admitted: Collection[int] = range(cohort)
        self.adapter_bytes = adapter_numel * FLOAT32_BYTES

    def submit(self, slot: int, delta: torch.Tensor, weight: int) -> None:
        self.aggregator.add(delta, weight)

    def finish(self) -> Collected:
        n = self.aggregator.count
        delta = self.aggregator.aggregate() if n else None
        self.aggregator.reset()
        down = len(self.admitted) * self.adapter_bytes
        return Collected(delta, n, n * self.adapter_bytes, down)


class SecureCollector:
    """SecAgg+: keys are exchanged on creation, masked inputs are summed as they come, `finish` unmasks."""

    def __init__(
        self,
        cfg: SecureAggregationConfig,
        cohort: int,
        adapter_numel: int,
        *,
        max_weight: int,
        round_num: int,
        dropout_draws: np.ndarray,
        rounding_rng: np.random.Generator,
        graph_seed: bytes | None,
    ) -> None:
        """`dropout_draws` is a [cohort, stages] array of uniforms: a client drops at its first stage whose
        draw falls below `cfg.dropout_rate` (simulated dropouts; with a rate of 0 nobody drops)."""
        drops = dropout_draws < cfg.dropout_rate
        first = np.where(drops.any(axis=1), drops.argmax(axis=1), -1)
        self.adapter_bytes = adapter_numel * FLOAT32_BYTES
        self.cohort = cohort
        self.round = SecAggRound(
            cohort,
            adapter_numel,
            bits=cfg.bits,
            clip_range=cfg.clip_range,
            max_weight=max_weight,
            rounding_rng=rounding_rng,
            threshold=None if cfg.threshold == "auto" else cfg.threshold,
            neighbours={"auto": None, "all": cohort - 1}.get(cfg.neighbours, cfg.neighbours),  # type: ignore[arg-type]
            dropouts={stage: set(np.flatnonzero(first == stage).tolist()) for stage in Stage},
            round_id=round_num,
            graph_seed=graph_seed,
        )
        self.abort: str | None = None
        self.admitted: Collection[int] = ()
        try:
            self.admitted = self.round.share_keys()  # stages 0-1, before anyone trains
        except SecAggAbort as exc:
            self.abort = str(exc)

    def submit(self, slot: int, delta: torch.Tensor, weight: int) -> None:
        self.round.submit(slot, delta.numpy(), weight)

    def finish(self) -> Collected:
        down = len(self.admitted) * self.adapter_bytes
        if self.abort is None:
            try:
                result = self.round.finish()
            except SecAggAbort as exc:
                self.abort = str(exc)
            else:
                return Collected(
                    torch.from_numpy(result.weighted_mean),
                    len(result.included),
                    sum(result.bytes_up),
                    down + sum(result.bytes_down),
                    result.metrics(),
                )
        up, protocol_down = self.round.bytes_so_far()
        return Collected(None, 0, up, down + protocol_down, {"secagg_abort": self.abort})
