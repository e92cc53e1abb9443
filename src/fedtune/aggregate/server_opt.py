"""Server optimizers: how the aggregated delta moves the global adapter (Reddi et al. 2021, FedOpt).

The aggregated delta is treated as a pseudo-gradient pointing downhill. Plain SGD with lr = 1 is FedAvg.
Each optimizer keeps its own small state (O(adapter)); none is tied to an aggregation rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtune.config import ServerConfig


class ServerOptimizer(Protocol):
    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new global adapter, given the current one and the aggregated delta."""
        ...


@dataclass
class ServerSGD:
    lr: float = 1.0

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return global_flat + self.lr * delta


@dataclass
class ServerMomentum:
    """FedAvgM (Hsu et al. 2019)."""

    lr: float = 1.0
    momentum: float = 0.9
    velocity: torch.Tensor | None = field(default=None, repr=False)

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.velocity is None:
            self.velocity = torch.zeros_like(delta)
        self.velocity = self.momentum * self.velocity + delta
        return global_flat + self.lr * self.velocity


@dataclass
class ServerAdaptive:
    """FedAdam and FedYogi: adaptive per-coordinate step sizes with adaptivity `eps` (tau)."""

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    yogi: bool = False
    m: torch.Tensor | None = field(default=None, repr=False)
    v: torch.Tensor | None = field(default=None, repr=False)

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.zeros_like(delta)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        sq = delta * delta
        if self.yogi:
            self.v = self.v - (1 - self.beta2) * sq * torch.sign(self.v - sq)
        else:
            self.v = self.beta2 * self.v + (1 - self.beta2) * sq
        return global_flat + self.lr * self.m / (self.v.sqrt() + self.eps)


def make_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    if cfg.optimizer == "sgd":
        return ServerSGD(lr=cfg.lr)
    if cfg.optimizer == "momentum":
        return ServerMomentum(lr=cfg.lr, momentum=cfg.momentum)
    return ServerAdaptive(
        lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, yogi=cfg.optimizer == "yogi"
    )
