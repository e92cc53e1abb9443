"""Aggregation rules: pure functions from client deltas and weights to one delta.

Each takes `deltas` as a [num_clients, num_params] float tensor and `weights` (examples per client) as a
[num_clients] tensor. `weighted_mean` is linear, so the aggregator can also compute it streaming, one
update at a time, without ever holding the stack; the robust rules need every delta at once and so
cannot run on a secure (sum-only) aggregate.
"""

from __future__ import annotations

import torch


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAvg: sum_i w_i * delta_i / sum_i w_i."""
    w = weights.to(deltas.dtype)
    return (w @ deltas) / w.sum()


def coordinate_median(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018); weights are ignored, as in the usual definition."""
    del weights
    n = deltas.shape[0]
    ordered = deltas.sort(dim=0).values
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def trimmed_mean(deltas: torch.Tensor, weights: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values per side."""
    del weights
    n = deltas.shape[0]
    k = int(trim_fraction * n)
    if k == 0:
        return deltas.mean(dim=0)
    ordered = deltas.sort(dim=0).values
    return ordered[k : n - k].mean(dim=0)
