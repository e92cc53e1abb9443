"""What the engine reads off a round's clients when they are unlike: their ranks and their local steps.

Pure functions of the run's plan and the round's members or accepted reports: which adapter values a
client of a lower LoRA rank trains and sends (`rank_coordinates`), the rank and weight of each aggregated
update for HetLoRA and FlexLoRA (`contributors`), and FedNova's scale, the aggregated clients' weighted
mean of local steps (`step_scale`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.aggregate.aggregator import Contributors
from fedtune.round.messages import ClientReport
from fedtune.round.plan import Member, RunPlan


def step_scale(plan: RunPlan, accepted: Mapping[int, ClientReport]) -> float:
    """FedNova (Wang et al. 2020): the updates are per local step, so their mean is scaled by the
    aggregated clients' weighted mean number of steps, tau_eff = sum_i w_i tau_i / sum_i w_i; 1 else."""
    if not plan.normalize_steps or not accepted:
        return 1.0
    reports = [accepted[slot] for slot in sorted(accepted)]
    weights = [plan.weights.of(r.num_examples) for r in reports]
    return sum(w * r.num_steps for w, r in zip(weights, reports, strict=True)) / sum(weights)


def rank_coordinates(
    plan: RunPlan, members: Sequence[Member], masks: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """By slot, the adapter values a client of a lower rank than the adapter's trains, receives and sends
    (its first components; `AdapterLayout.rank_mask`); `masks` caches one mask per rank across rounds."""
    if plan.ranks is None or plan.layout is None:
        return {}
    full = min(plan.layout.ranks)
    lower = {m.slot: plan.ranks[m.index] for m in members if plan.ranks[m.index] < full}
    for rank in set(lower.values()) - set(masks):
        masks[rank] = plan.layout.rank_mask(rank)
    return {slot: masks[rank] for slot, rank in lower.items()}


def contributors(
    plan: RunPlan, accepted: Mapping[int, ClientReport], members: Sequence[Member]
) -> Contributors | None:
    """Heterogeneous ranks: each aggregated update's rank and weight, in slot order (the stack's)."""
    if plan.ranks is None:
        return None
    slots = sorted(accepted)
    return Contributors(
        tuple(plan.ranks[members[slot].index] for slot in slots),
        tuple(float(plan.weights.of(accepted[slot].num_examples)) for slot in slots),
    )
