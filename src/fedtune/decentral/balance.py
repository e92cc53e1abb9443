"""BALANCE (Fang et al., "Byzantine-Robust Decentralized Federated Learning", CCS 2024): each client judges
its neighbours' adapters by their distance to its own.

Client i, holding w_i after its local training in round t of T, accepts neighbour j's adapter w_j when

    ||w_i - w_j|| <= gamma * exp(-kappa * t / T) * ||w_i||

(a bound relative to its own adapter's norm that tightens as the models converge: kappa = 0 keeps it at
gamma), and keeps w_i <- alpha * w_i + (1 - alpha) * mean_{j accepted} w_j, or w_i itself when it accepted
none. A Byzantine neighbour must stay within the bound to be heard, so the accepted mean is within the
bound of w_i and one round moves a client by at most (1 - alpha) times the bound, whatever it is sent.
The distances to all of a client's neighbours are one `torch.cdist` not through the
matrix-product expansion, whose cancellation would blur distances that are small next to the norms); the
accepted mean is one masked matrix product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.decentral.mixing import Mixed


def balance_bound(*, gamma: float, kappa: float, round_num: int, rounds: int) -> float:
    """gamma * exp(-kappa * t / T): how far a neighbour's adapter may be in round t of T, relative to
    ||w_i|| (the threshold is this times the client's own adapter norm)."""
    if rounds < 1 or not 0 <= round_num <= rounds:
        raise ValueError(f"round {round_num} of {rounds}: need 0 <= t <= T and T >= 1")
    return gamma * math.exp(-kappa * round_num / rounds)


def neighbour_distances(own: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """||w_i - w_j|| for every row j of `neighbours` ([neighbours, params] -> [neighbours])."""
    if neighbours.shape[0] == 0:
        return neighbours.new_zeros(0)
    return torch.cdist(own[None], neighbours, compute_mode="donot_use_mm_for_euclid_dist")[0]


def balance(
    own: torch.Tensor,
    neighbours: torch.Tensor,
    *,
    gamma: float,
    kappa: float,
    alpha: float,
    round_num: int,
    rounds: int,
) -> Mixed:
    """Client i's BALANCE step: filter its neighbours' adapters by distance, then mix (see the module)."""
    bound = balance_bound(gamma=gamma, kappa=kappa, round_num=round_num, rounds=rounds)
    own_norm = torch.linalg.vector_norm(own)
    distances = neighbour_distances(own, neighbours)
    accepted = distances <= bound * own_norm
    relative = distances / own_norm
    count = int(accepted.sum())
    if count == 0:
        return Mixed(own.clone(), accepted, relative, bound)
    mean = (accepted.to(neighbours.dtype) @ neighbours) / count
    return Mixed(alpha * own + (1 - alpha) * mean, accepted, relative, bound)


@dataclass(frozen=True)
class Balance:
    """BALANCE as a `NeighbourRule`, with its three settings (`server.balance_*`)."""

    gamma: float
    kappa: float
    alpha: float

    def __call__(self, own: torch.Tensor, neighbours: torch.Tensor, *, round_num: int, rounds: int) -> Mixed:
        return balance(
            own,
            neighbours,
            gamma=self.gamma,
            kappa=self.kappa,
            alpha=self.alpha,
            round_num=round_num,
            rounds=rounds,
        )
