"""The aggregator composes a rule with a server optimizer: `Aggregator(rule, server_opt)`.

Updates arrive one at a time through `add`. For the linear FedAvg rule they are folded into a running
weighted sum, so memory is O(adapter) whatever the number of clients; other rules keep the round's deltas.
Secure aggregation will replace the running sum by an unmasked sum; the rest stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from fedtune.aggregate import rules
from fedtune.aggregate.server_opt import ServerOptimizer, make_server_optimizer
from fedtune.config import ServerConfig

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Aggregator:
    def __init__(self, rule: Rule, server_opt: ServerOptimizer) -> None:
        self.rule = rule
        self.server_opt = server_opt
        self.streaming = rule is rules.weighted_mean
        self.reset()

    def reset(self) -> None:
        """Forget the round's updates."""
        self._sum: torch.Tensor | None = None
        self._weight_sum = 0.0
        self._deltas: list[torch.Tensor] = []
        self._weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self._weights)

    def add(self, delta: torch.Tensor, weight: float) -> None:
        """Take one client's delta with its weight (number of training examples)."""
        if weight <= 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        self._weights.append(float(weight))
        if self.streaming:
            if self._sum is None:
                self._sum = torch.zeros_like(delta, dtype=torch.float64)
            self._sum.add_(delta, alpha=float(weight))
            self._weight_sum += float(weight)
        else:
            self._deltas.append(delta)

    def aggregate(self) -> torch.Tensor:
        """The round's aggregated delta (float32), without applying it."""
        if not self._weights:
            raise ValueError("no client update reached the aggregator this round")
        if self.streaming:
            assert self._sum is not None
            return (self._sum / self._weight_sum).to(torch.float32)
        stacked = torch.stack(self._deltas)
        return self.rule(stacked, torch.tensor(self._weights, dtype=stacked.dtype))

    def finish(self, global_flat: torch.Tensor) -> torch.Tensor:
        """Aggregate the round, step the server optimizer, and start a fresh round."""
        delta = self.aggregate()
        self.reset()
        return self.server_opt.step(global_flat, delta)


def make_aggregator(cfg: ServerConfig) -> Aggregator:
    rule: Rule
    if cfg.rule == "fedavg":
        rule = rules.weighted_mean
    elif cfg.rule == "median":
        rule = rules.coordinate_median
    else:
        rule = partial(rules.trimmed_mean, trim_fraction=cfg.trim_fraction)
    return Aggregator(rule=rule, server_opt=make_server_optimizer(cfg))
