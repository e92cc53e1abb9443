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
the round's `Aggregated`. FLTrust's rule also takes the server's own update on its root data: the
aggregator asks its `reference` for it from the global adapter at aggregate time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from fedtune.aggregate import robust, rules
from fedtune.aggregate.lora_merge import Merged, RankWeightedMean, SvdMerge
from fedtune.aggregate.server_opt import ServerOptimizer, make_server_optimizer
from fedtune.aggregate.settings import ServerConfig
from fedtune.layout import AdapterLayout


class AggregationRule(Protocol):
    """Deltas [clients, params] and weights [clients] in, one delta [params] out (see `rules`)."""

    def __call__(self, deltas: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor: ...


class ReferencedRule(Protocol):
    """A rule that also takes the server's own delta [params] (FLTrust's, `robust.fltrust`)."""

    def __call__(
        self, deltas: torch.Tensor, weights: torch.Tensor, /, *, reference: torch.Tensor
    ) -> torch.Tensor: ...


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
    rule: AggregationRule | ReferencedRule  # a ReferencedRule exactly when `reference` is set
    server_opt: ServerOptimizer
    merge: SvdMerge | None = None  # product-space aggregation: replaces rule and optimizer when set
    by_rank: RankWeightedMean | None = None  # hetlora: each coordinate's mean over the clients training it
    # fltrust: the server's own delta (on its root data) from the current global adapter's flat vector
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def linear(self) -> bool:
        """The rule is FedAvg's weighted mean: it runs on sums (streaming, secure aggregation, DP)."""
        return self.rule is rules.weighted_mean and self.merge is None

    def delta(
        self,
        updates: SummedUpdates | StackedUpdates,
        scale: float = 1.0,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The round's aggregated delta (float32) times `scale`, without applying it. `reference`: the
        server's own delta, for an aggregator with a `reference` (`aggregate` asks it for one)."""
        if isinstance(updates, SummedUpdates):
            if not self.linear:
                raise ValueError("a rule other than the weighted mean needs every update, not their sum")
            if updates.denominator <= 0:
                raise ValueError("the sum's denominator must be positive")
            mean = updates.total / updates.denominator
            return (mean if scale == 1.0 else mean * scale).to(torch.float32)
        if updates.count == 0:
            raise ValueError("no client update reached the aggregator this round")
        if self.reference is None:
            delta = self.rule(updates.deltas, updates.weights)
        elif reference is None:
            raise ValueError("this rule compares the updates with the server's own delta: pass reference=")
        else:
            delta = self.rule(updates.deltas, updates.weights, reference=reference)
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
        reference = None  # the server's own delta: trained only for a round with updates to compare
        if self.reference is not None and isinstance(updates, StackedUpdates) and updates.count > 0:
            reference = self.reference(global_flat)
        return Merged(self.server_opt.step(global_flat, self.delta(updates, scale, reference)), None)

    def step(self, global_flat: torch.Tensor, updates: SummedUpdates | StackedUpdates) -> torch.Tensor:
        """The new global adapter (see `aggregate`)."""
        return self.aggregate(global_flat, updates).global_flat


def make_aggregator(
    cfg: ServerConfig,
    *,
    layout: AdapterLayout | None = None,
    rule: AggregationRule | None = None,
    server_opt: ServerOptimizer | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Aggregator:
    """`[server]`'s rule and optimizer; a user's own `rule` or `server_opt` replaces the configured one.
    `layout` (the adapter's) is what a product-space `lora_aggregation` reads. `reference` (the server's
    own delta on its root data, from the global adapter) is what `rule = "fltrust"` needs, and only it."""
    merge, by_rank = None, None
    if cfg.lora_aggregation in ("svd", "flexlora", "hetlora"):
        if layout is None:
            raise ValueError(f"server.lora_aggregation = {cfg.lora_aggregation!r} needs the adapter's layout")
        if cfg.lora_aggregation == "hetlora":
            by_rank = RankWeightedMean(layout)
        else:
            merge = SvdMerge(layout, lr=cfg.lr)
    chosen: AggregationRule | ReferencedRule
    if rule is not None:
        chosen = rule
        if reference is not None:
            raise ValueError("a reference delta is for server.rule = 'fltrust', not a user's own rule")
    elif cfg.rule == "fltrust":
        if reference is None:
            raise ValueError(
                "server.rule = 'fltrust' scores each update against the server's own update on its root "
                "data: pass make_aggregator a reference, or choose another server.rule"
            )
        chosen = robust.fltrust
    else:
        if reference is not None:
            raise ValueError(f"a reference delta is for server.rule = 'fltrust', not {cfg.rule!r}")
        chosen = configured_rule(cfg)
    opt = server_opt or make_server_optimizer(cfg)
    return Aggregator(chosen, opt, merge=merge, by_rank=by_rank, reference=reference)


def configured_rule(cfg: ServerConfig) -> AggregationRule:
    """`server.rule` and its settings as a rule (every one but fltrust, which needs a reference)."""
    table: dict[str, AggregationRule] = {
        "fedavg": rules.weighted_mean,
        "median": rules.coordinate_median,
        "trimmed_mean": partial(rules.trimmed_mean, trim_fraction=cfg.trim_fraction),
        "norm_bound": partial(
            robust.norm_bound, bound=cfg.norm_bound, median_multiple=cfg.norm_bound_median_multiple
        ),
        "krum": partial(robust.krum, byzantine=cfg.byzantine),
        "multi_krum": partial(robust.multi_krum, byzantine=cfg.byzantine, keep=cfg.multi_krum_keep),
        "geometric_median": partial(robust.geometric_median, iterations=cfg.geometric_median_iterations),
        "centered_clip": partial(
            robust.centered_clip, tau=cfg.centered_clip_tau, iterations=cfg.centered_clip_iterations
        ),
    }
    if cfg.rule not in table:
        raise ValueError(
            f"server.rule = {cfg.rule!r} is not a rule over one round's updates alone (fltrust needs a "
            "reference: use make_aggregator; balance runs in fedtune.decentral)"
        )
    return table[cfg.rule]
