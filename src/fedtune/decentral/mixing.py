"""How a client of a decentralized federation mixes its adapter with its neighbours': the `NeighbourRule`
protocol, its typed result, and the plain rule, gossip averaging.

A rule takes the client's own adapter after local training (`own`, [params]) and the adapters its
neighbours trained this round (`neighbours`, [neighbours, params], rows in neighbour order) and returns the
client's adapter for the next round. `gossip_average` (`server.rule = "fedavg"` in a decentralized
topology) is the D-PSGD baseline (Lian et al. 2017): the equal-weight mean of the own adapter and every
neighbour's, accepting them all. On a regular graph (ring, k_regular) its mixing matrix is doubly
stochastic and the clients reach the population's mean; on an irregular one (erdos_renyi) it is only row
stochastic, and the consensus leans toward well-connected clients. BALANCE is in `balance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, eq=False)
class Mixed:
    """A client's adapter after mixing, and which neighbours' adapters went into it."""

    flat: torch.Tensor  # float32 [params]: the client's adapter for the next round
    accepted_mask: torch.Tensor  # bool [neighbours]: this neighbour's adapter was averaged in
    # BALANCE: each neighbour's ||w_i - w_j|| / ||w_i||, and the round's bound on it, gamma * exp(-kappa t/T)
    # (None for a rule that accepts every neighbour)
    relative_distances: torch.Tensor | None = None
    bound: float | None = None

    @property
    def accepted(self) -> int:
        return int(self.accepted_mask.sum())

    @property
    def rejected(self) -> int:
        return int(self.accepted_mask.numel()) - self.accepted


class NeighbourRule(Protocol):
    def __call__(self, own: torch.Tensor, neighbours: torch.Tensor, *, round_num: int, rounds: int) -> Mixed:
        """The client's next adapter from its own and its neighbours' (`round_num` of `rounds`)."""
        ...


def gossip_average(own: torch.Tensor, neighbours: torch.Tensor, *, round_num: int, rounds: int) -> Mixed:
    """(w_i + sum_j w_j) / (|N(i)| + 1): every neighbour accepted, with the own adapter's weight."""
    del round_num, rounds
    flat = (own + neighbours.sum(dim=0)) / (neighbours.shape[0] + 1)
    return Mixed(flat, torch.ones(neighbours.shape[0], dtype=torch.bool))
