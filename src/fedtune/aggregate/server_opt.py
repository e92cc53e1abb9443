"""Server optimizers: how the aggregated delta moves the global adapter (Reddi et al. 2021, FedOpt).

The aggregated delta is treated as a pseudo-gradient pointing downhill. Plain SGD with lr = 1 is FedAvg.
Each optimizer keeps its own small state (O(adapter)); none is tied to an aggregation rule. `state_dict`
holds only the tensors that exist (nothing for SGD or before the first step), so a server restarted from
a checkpoint continues bit-identically; `load_state_dict` refuses an unknown or missing key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtune.aggregate.settings import ServerConfig
from fedtune.errors import StateError


class ServerOptimizer(Protocol):
    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new global adapter, given the current one and the aggregated delta."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's tensors that exist so far; empty when there are none."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned; StateError on an unknown or missing key."""
        ...


def _checked(state: Mapping[str, torch.Tensor], owner: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`state` as copies, if it holds either nothing (before the first step) or exactly `keys`."""
    unknown = sorted(set(state) - set(keys))
    if unknown:
        raise StateError(
            f"{owner} state has unknown key {unknown[0]!r} (expected {list(keys) or 'none'}): the state "
            "file was written for another server optimizer; keep server.optimizer as it was for this run"
        )
    missing = [k for k in keys if k not in state]
    if state and missing:
        raise StateError(
            f"{owner} state is missing key {missing[0]!r}: the state file is corrupt; restore it or start "
            "a new run.dir"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise StateError(f"{owner} state key {key!r} is not a tensor: the state file is corrupt")
    return {k: v.detach().clone() for k, v in state.items()}


@dataclass
class ServerSGD:
    lr: float = 1.0

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return global_flat + self.lr * delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _checked(state, "ServerSGD", ())


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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.velocity is None else {"velocity": self.velocity.detach().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.velocity = _checked(state, "ServerMomentum", ("velocity",)).get("velocity")


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

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.detach().clone(), "v": self.v.detach().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        loaded = _checked(state, "ServerAdaptive", ("m", "v"))
        self.m, self.v = loaded.get("m"), loaded.get("v")


def make_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    if cfg.optimizer == "sgd":
        return ServerSGD(lr=cfg.lr)
    if cfg.optimizer == "momentum":
        return ServerMomentum(lr=cfg.lr, momentum=cfg.momentum)
    return ServerAdaptive(
        lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, yogi=cfg.optimizer == "yogi"
    )
