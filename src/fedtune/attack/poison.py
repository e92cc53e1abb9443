"""Model poisoning as pure functions: an attacker's honest delta (or the attackers' pooled honest deltas)
in, the delta it sends out.

`sign_flip` and `scale` transform the attacker's own delta, `gaussian` replaces it by noise of a chosen
size, `free_rider` sends nothing of value. `alie` and `min_max` are collusive: every attacker of the round
sends the same vector, made from the mean and spread of the attackers' own honest deltas (the papers'
setting where the attackers do not see the honest clients' updates). Every function is vectorized over
the adapter; `min_max`'s largest gamma comes in closed form from one quadratic per honest delta.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal

import torch


def sign_flip(delta: torch.Tensor) -> torch.Tensor:
    """The honest delta reversed: the attacker pushes the global adapter back up its own loss."""
    return -delta


def scale(delta: torch.Tensor, boost: float) -> torch.Tensor:
    """Model replacement (Bagdasaryan et al. 2020): the delta times `boost`; with `boost` = the cohort
    size, FedAvg's mean moves by the attacker's delta alone."""
    return delta * boost


def gaussian(delta: torch.Tensor, rms_multiple: float, generator: torch.Generator) -> torch.Tensor:
    """Noise N(0, s^2) per value, s = `rms_multiple` x the honest delta's root mean square."""
    rms = float(delta.double().pow(2).mean().sqrt())
    noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32)
    return noise.mul_(rms_multiple * rms)


def free_rider(delta_numel: int) -> torch.Tensor:
    """A zero update: the free rider takes the global adapter and gives nothing back."""
    return torch.zeros(delta_numel, dtype=torch.float32)


def alie_z(population: int, attackers: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): with s = floor(n/2 + 1) - f honest clients needed for a
    majority, the z for which (n - s) / n of the normal lies below mean + z * std; at least 0."""
    s = math.floor(population / 2 + 1) - attackers
    share = (population - s) / population
    if share <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(share, 1 - 1e-9))


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """A little is enough: mean - z * std per coordinate of the attackers' honest deltas [k, params],
    a shift each robust rule's per-coordinate statistics can hardly tell from honest variation."""
    if honest.shape[0] < 2:
        raise ValueError("ALIE's spread needs the honest deltas of at least two attackers")
    mean = honest.mean(dim=0)
    return mean - z * honest.std(dim=0)


def min_max(honest: torch.Tensor, direction: Literal["unit", "std", "sign"]) -> torch.Tensor:
    """Min-Max (Shejwalkar & Houmansadr 2021): mean + gamma * p, with p = -mean/||mean|| (unit), -std
    (std) or -sign(mean) (sign), and the largest gamma whose distance to every honest delta stays within
    the honest deltas' largest pairwise distance D. ||mean + gamma p - b_i||^2 = c_i + 2 gamma q_i +
    gamma^2 a is a quadratic in gamma per honest delta b_i, so gamma is the smallest positive root of
    c_i + 2 gamma q_i + gamma^2 a = D^2 (c_i <= D^2, as the mean is inside the honest deltas' hull)."""
    if honest.shape[0] < 2:
        raise ValueError("Min-Max's distance bound needs the honest deltas of at least two attackers")
    h = honest.double()
    mean = h.mean(dim=0)
    if direction == "unit":
        p = -mean / mean.norm().clamp_min(1e-30)
    elif direction == "std":
        p = -h.std(dim=0)
    else:
        p = -torch.sign(mean)
    bound = torch.cdist(h, h).max().pow(2)
    offsets = mean - h  # [k, params]
    a = p.dot(p).clamp_min(1e-30)
    q = offsets @ p
    c = offsets.pow(2).sum(dim=1)
    gamma = (-q + (q.pow(2) + a * (bound - c).clamp_min(0)).sqrt()) / a
    return (mean + gamma.min() * p).to(honest.dtype)
