"""The server's side of a round after the updates are in: rule -> server optimizer, composed.

`Aggregator(rule, server_opt)` pairs any rule with any optimizer. The round's updates reach it in one of
two shapes. `SummedUpdates` is a sum of weighted deltas and the denominator that makes it a mean: what a
streaming FedAvg, a secure aggregation (the server sees nothing else) and client-level DP (noise is added to
the sum, the denominator is public) produce; the weighted-mean rule works on it directly, with no
mean -> sum round trip. `StackedUpdates` holds every delta, for the rules that need each one (median,
trimmed mean, a user's own rule). `RunningSum` and `UpdateStack` build them one update at a time, so a
FedAvg round holds O(adapter) whatever the number of clients. With a product-space `merge`
(`server.lora_aggregation = "svd"`, `lora_merge.SvdMerge`) the stack goes to the merge instead of the rule
and optimizer: it re-factors the mean of the clients' B_i A_i, and its truncation residual comes back in
the round's `Aggregated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from fedtune.aggregate import rules
from fedtune.aggregate.lora_merge import Merged, RankWeightedMean, SvdMerge
from fedtune.aggregate.server_opt import ServerOptimizer, make_server_optimizer
from fedtune.aggregate.settings import ServerConfig
from fedtune.layout import AdapterLayout


class AggregationRule(Protocol):
    """Deltas [clients, params] and weights [clients] in, one delta [params] out (see `rules`)."""

    def __call__(self, deltas: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class SummedUpdates:
    """sum_i w_i * delta_i (float64), the denominator that makes it the round's mean, and how many
    updates are in it. Under client-level DP the weights are 1 and the denominator is the public cohort."""

    total: torch.Tensor
    denominator: float
    count: int


@dataclass(frozen=True, eq=False)
class StackedUpdates:
    """Every update of the round, for rules that need each one."""

    deltas: torch.Tensor  # [clients, params]
    weights: torch.Tensor  # [clients]

    @property
    def count(self) -> int:
        return int(self.weights.shape[0])


class RunningSum:
    """sum_i w_i * delta_i in float64, one update at a time."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.weight = 0.0
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        if self.total is None:
            self.total = torch.zeros_like(delta, dtype=torch.float64)
        self.total.add_(delta, alpha=float(weight))
        self.weight += float(weight)
        self.count += 1

    def summed(self, numel: int, denominator: float | None = None) -> SummedUpdates:
        """The sum (zeros when nothing arrived) over `denominator`, by default the summed weight."""
        total = self.total if self.total is not None else torch.zeros(numel, dtype=torch.float64)
        return SummedUpdates(total, self.weight if denominator is None else denominator, self.count)


class UpdateStack:
    """Every update of the round, kept for a rule that needs them all. `stacked` orders them by the
    `position` each was added with (the round's slot), not by arrival: a rule whose float result depends
    on the order (a user's own, the SVD merge) then gives the same bits over any transport."""

    def __init__(self) -> None:
        self.deltas: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.positions: list[int] = []

    @property
    def count(self) -> int:
        return len(self.deltas)

    def add(self, delta: torch.Tensor, weight: float, position: int | None = None) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        self.deltas.append(delta)
        self.weights.append(float(weight))
        self.positions.append(len(self.positions) if position is None else position)

    def stacked(self) -> StackedUpdates:
        order = sorted(range(self.count), key=self.positions.__getitem__)
        deltas = torch.stack([self.deltas[k] for k in order])
        return StackedUpdates(deltas, torch.tensor([self.weights[k] for k in order], dtype=deltas.dtype))


@dataclass(frozen=True)
class Contributors:
    """Heterogeneous ranks: the rank each aggregated update was trained at and its weight, in the order
    of `StackedUpdates.deltas` (the round's slots)."""

    ranks: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass
class Aggregator:
    rule: AggregationRule
    server_opt: ServerOptimizer
    merge: SvdMerge | None = None  # product-space aggregation: replaces rule and optimizer when set
    by_rank: RankWeightedMean | None = None  # hetlora: each coordinate's mean over the clients training it

    @property
    def linear(self) -> bool:
        """The rule is FedAvg's weighted mean: it runs on sums (streaming, secure aggregation, DP)."""
        return self.rule is rules.weighted_mean and self.merge is None

    def delta(self, updates: SummedUpdates | StackedUpdates, scale: float = 1.0) -> torch.Tensor:
        """The round's aggregated delta (float32) times `scale`, without applying it."""
        if isinstance(updates, SummedUpdates):
            if not self.linear:
                raise ValueError("a rule other than the weighted mean needs every update, not their sum")
            if updates.denominator <= 0:
                raise ValueError("the sum's denominator must be positive")
            mean = updates.total / updates.denominator
            return (mean if scale == 1.0 else mean * scale).to(torch.float32)
        if updates.count == 0:
            raise ValueError("no client update reached the aggregator this round")
        delta = self.rule(updates.deltas, updates.weights)
        return (delta if scale == 1.0 else delta * scale).to(torch.float32)

    def aggregate(
        self,
        global_flat: torch.Tensor,
        updates: SummedUpdates | StackedUpdates,
        scale: float = 1.0,
        contributors: Contributors | None = None,
    ) -> Merged:
        """The new global adapter: the rule's delta times `scale` (FedNova's mean local steps) through
        the server optimizer, or the merge's re-factored mean product (with its truncation residual).
        `contributors`: the ranks the updates were trained at, when clients train different ranks."""
        ranks = None if contributors is None else contributors.ranks
        if self.merge is not None:
            if scale != 1.0:
                raise ValueError("a product-space merge takes the clients' whole deltas, not rescaled ones")
            if not isinstance(updates, StackedUpdates):
                raise ValueError("a product-space merge needs every update, not their sum")
            if updates.count == 0:
                raise ValueError("no client update reached the aggregator this round")
            return self.merge(global_flat, updates.deltas, updates.weights, ranks)
        if self.by_rank is not None and contributors is not None:
            if not isinstance(updates, SummedUpdates):
                raise ValueError("the rank-weighted mean takes the weighted sum of the updates")
            mean = self.by_rank.mean(updates.total, contributors.weights, contributors.ranks)
            delta = (mean if scale == 1.0 else mean * scale).to(torch.float32)
            return Merged(self.server_opt.step(global_flat, delta), None)
        return Merged(self.server_opt.step(global_flat, self.delta(updates, scale)), None)

    def step(self, global_flat: torch.Tensor, updates: SummedUpdates | StackedUpdates) -> torch.Tensor:
        """The new global adapter (see `aggregate`)."""
        return self.aggregate(global_flat, updates).global_flat


def make_aggregator(
    cfg: ServerConfig,
    *,
    layout: AdapterLayout | None = None,
    rule: AggregationRule | None = None,
    server_opt: ServerOptimizer | None = None,
) -> Aggregator:
    """`[server]`'s rule and optimizer; a user's own `rule` or `server_opt` replaces the configured one.
    `layout` (the adapter's) is what a product-space `lora_aggregation` reads."""
    merge, by_rank = None, None
    if cfg.lora_aggregation in ("svd", "flexlora", "hetlora"):
        if layout is None:
            raise ValueError(f"server.lora_aggregation = {cfg.lora_aggregation!r} needs the adapter's layout")
        if cfg.lora_aggregation == "hetlora":
            by_rank = RankWeightedMean(layout)
        else:
            merge = SvdMerge(layout, lr=cfg.lr)
    if rule is None:
        if cfg.rule == "fedavg":
            rule = rules.weighted_mean
        elif cfg.rule == "median":
            rule = rules.coordinate_median
        else:
            rule = partial(rules.trimmed_mean, trim_fraction=cfg.trim_fraction)
    return Aggregator(rule, server_opt or make_server_optimizer(cfg), merge=merge, by_rank=by_rank)
