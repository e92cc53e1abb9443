"""How a round's client deltas become one aggregated delta: in the clear, or through secure aggregation.

A collector is made per round and has one shape whatever the protocol: `admitted` (the cohort slots that
may train: secure aggregation exchanges keys first, and a client that drops then never trains), `submit`
(one client's delta and weight, as soon as it has trained), `finish` (the aggregated delta, or None when
nothing could be aggregated, with the round's bytes and protocol metrics). The server optimizer is applied
by the caller, so any collector composes with any optimizer, in simulation now and over a transport later.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedtune.aggregate import Aggregator
from fedtune.compress import decode
from fedtune.config import SecureAggregationConfig
from fedtune.privacy.distributed import NoisedSum, decode_noised_sum
from fedtune.secagg import SecAggAbort, SecAggRound, Stage, default_threshold
from fedtune.secagg.graph import resolve_neighbours

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Collected:
    """A round's outcome: the aggregated delta (None if the round applied nothing) and what it cost."""

    delta: torch.Tensor | None
    clients: int  # updates inside the aggregate (weight 1 each under DP)
    bytes_up: int
    bytes_down: int
    metrics: dict[str, Any] = field(default_factory=dict)
    noised_sum: NoisedSum | None = None  # distributed DP: the decoded sum with every share's noise


Noise = Callable[[np.ndarray], np.ndarray]


class Collector(Protocol):
    @property
    def admitted(self) -> Collection[int]: ...
    def submit(
        self, slot: int, update: torch.Tensor | bytes, weight: int, noise: Noise | None = None
    ) -> None: ...
    def finish(self) -> Collected: ...


class PlainCollector:
    """Updates in the clear into the aggregator's rule (streaming for FedAvg): a float32 delta, or a
    compressed payload that the server decodes first, as it would off the wire. `admit` (a deployed
    server's) checks or clips each decoded delta before it is aggregated, raising to refuse it."""

    def __init__(
        self,
        aggregator: Aggregator,
        cohort: int,
        adapter_numel: int,
        shared_seed: bytes | None = None,
        admit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.admitted: Collection[int] = range(cohort)
        self.numel = adapter_numel
        self.shared_seed = shared_seed
        self.admit = admit
        self.bytes_up = 0

    def submit(
        self, slot: int, update: torch.Tensor | bytes, weight: int, noise: Noise | None = None
    ) -> None:
        if noise is not None:
            raise ValueError("per-client noise shares need secure aggregation (privacy.mode = 'distributed')")
        if isinstance(update, bytes):
            self.bytes_up += len(update)
            update = decode(update, self.numel, seed=self.shared_seed)
        else:
            self.bytes_up += update.numel() * FLOAT32_BYTES
        if self.admit is not None:
            update = self.admit(update)
        self.aggregator.add(update, weight)

    def finish(self) -> Collected:
        n = self.aggregator.count
        delta = self.aggregator.aggregate() if n else None
        self.aggregator.reset()
        down = len(self.admitted) * self.numel * FLOAT32_BYTES
        return Collected(delta, n, self.bytes_up, down)


def secure_threshold(cfg: SecureAggregationConfig, cohort: int) -> int:
    """t for a round of `cohort` clients, as `SecAggRound` resolves it."""
    k = resolve_neighbours(cfg.neighbours, cohort)
    return default_threshold(k) if cfg.threshold == "auto" else cfg.threshold


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
        download_bytes: int,
        expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`dropout_draws` is a [cohort, stages] array of uniforms: a client drops at its first stage whose
        draw falls below `cfg.dropout_rate` (simulated dropouts; with a rate of 0 nobody drops).
        `adapter_numel` is the length of what is masked (random-k: the kept values), and `expand` maps
        the unmasked mean back onto the adapter (random-k: onto the round's shared coordinates)."""
        drops = dropout_draws < cfg.dropout_rate
        first = np.where(drops.any(axis=1), drops.argmax(axis=1), -1)
        self.expand = expand
        self.download_bytes = download_bytes  # the global adapter each admitted client receives
        self.cohort = cohort
        self.round = SecAggRound(
            cohort,
            adapter_numel,
            bits=cfg.bits,
            clip_range=cfg.clip_range,
            max_weight=max_weight,
            rounding_rng=rounding_rng,
            threshold=None if cfg.threshold == "auto" else cfg.threshold,
            neighbours=resolve_neighbours(cfg.neighbours, cohort),
            dropouts={stage: set(np.flatnonzero(first == stage).tolist()) for stage in Stage},
            round_id=round_num,
            graph_seed=graph_seed,
        )
        self.abort: str | None = None
        self.noised = False
        self.admitted: Collection[int] = ()
        try:
            self.admitted = self.round.share_keys()  # stages 0-1, before anyone trains
        except SecAggAbort as exc:
            self.abort = str(exc)

    def submit(
        self, slot: int, update: torch.Tensor | bytes, weight: int, noise: Noise | None = None
    ) -> None:
        if isinstance(update, bytes):
            raise TypeError("secure aggregation masks values, not compressed payloads")
        self.noised = self.noised or noise is not None
        self.round.submit(slot, update.numpy(), weight, noise)

    def finish(self) -> Collected:
        down = len(self.admitted) * self.download_bytes
        if self.abort is None:
            try:
                result = self.round.finish_with(decode_noised_sum) if self.noised else self.round.finish()
            except SecAggAbort as exc:
                self.abort = str(exc)
            else:
                up, down = sum(result.bytes_up), down + sum(result.bytes_down)
                if self.noised:
                    noised: NoisedSum = result.decoded
                    if self.expand is not None:
                        total = self.expand(torch.from_numpy(noised.total).to(torch.float32))
                        noised = NoisedSum(total.numpy(), noised.contributors)
                    return Collected(None, noised.contributors, up, down, result.metrics(), noised)
                mean = torch.from_numpy(result.weighted_mean)
                delta = mean if self.expand is None else self.expand(mean)
                return Collected(delta, len(result.included), up, down, result.metrics())
        up, protocol_down = self.round.bytes_so_far()
        return Collected(None, 0, up, down + protocol_down, {"secagg_abort": self.abort})
