"""A round's training phase on the server, in the clear or under SecAgg+, to one typed `Collected`.

`collect_plain` sends each member its `TrainRequest` (a lower-rank client's request names how many values
it sends) and takes the replies into a `PlainCollection`: a streaming sum for FedAvg, a stack for a rule
that needs every update. Under client-level DP the noised sum is released whoever answered, so the sum is
taken over the public denominator even when nobody did. `collect_secure` runs SecAgg+ through the
transport (`secure`), with distributed DP's noise shares where they are on. `failure` is the round's
failure policy on either outcome: a SecAgg+ abort, or fewer than `federation.min_clients` updates outside
DP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtune.aggregate import StackedUpdates, SummedUpdates
from fedtune.privacy.dpfedavg import ClientLevelDp
from fedtune.round.collect import PlainCollection
from fedtune.round.messages import ClientReport, TrainRequest, TrainTask
from fedtune.round.plan import Member, RunPlan
from fedtune.round.ranks import rank_coordinates
from fedtune.round.results import SecAggMetrics
from fedtune.round.secure import run_secure_round
from fedtune.round.transport import Exchange, Phase, Transport
from fedtune.seeding import derive_seed


@dataclass(frozen=True, eq=False)
class Collected:
    """A training phase's outcome, from either path."""

    updates: SummedUpdates | StackedUpdates | None  # None: nothing to aggregate (or a SecAgg+ abort)
    reports: Mapping[int, ClientReport]  # by slot, every submission's report, accepted or not
    accepted: Mapping[int, ClientReport]  # by slot, the updates taken into the sum or the stack
    failures: Mapping[int, tuple[str, str]]  # slot -> (client id, reason)
    bytes_up: int
    bytes_down: int
    seconds: float
    secagg: SecAggMetrics | None = None


def collect_plain(
    transport: Transport,
    plan: RunPlan,
    task: TrainTask,
    members: Sequence[Member],
    *,
    linear: bool,
    dp: ClientLevelDp | None,
    rank_masks: dict[int, torch.Tensor],
) -> Collected:
    """The members' updates in the clear. `linear`: the rule is the weighted mean (summed as they come);
    `rank_masks` caches one coordinate mask per lower LoRA rank across rounds."""
    target = plan.cohort if plan.selected > plan.cohort else None
    coordinates = rank_coordinates(plan, members, rank_masks)
    collection = PlainCollection(
        numel=plan.update_numel,
        weights=plan.weights,
        linear=linear,
        shared_seed=task.shared_seed,
        clip_l2_norm=None if dp is None else dp.clip_l2_norm,
        target=target,
        coordinates=coordinates,
    )
    messages = {
        m.slot: TrainRequest(task, m, None if m.slot not in coordinates else int(coordinates[m.slot].sum()))
        for m in members
    }
    done = transport.exchange(Exchange(Phase.TRAIN, messages, collection.deliver, target))
    updates: SummedUpdates | StackedUpdates | None = None
    if dp is not None:  # the noised sum is released whoever answered: zeros count as zeros
        updates = collection.summed(dp.plan.denominator)
    elif collection.updates.count:
        updates = collection.summed()
    return Collected(
        updates,
        collection.reports,
        collection.accepted,
        collection.failures,
        collection.bytes_up,
        sum(messages[slot].nbytes() for slot in done.received),
        done.seconds,
    )


def collect_secure(
    transport: Transport,
    plan: RunPlan,
    task: TrainTask,
    members: Sequence[Member],
    *,
    dp: ClientLevelDp | None,
) -> Collected:
    """The members' weighted sum under SecAgg+ (the plan's `secure` settings); under DP, over the public
    denominator, holding the clients' noise shares when the noise is distributed."""
    secure = plan.secure
    if secure is None:
        raise ValueError("a secure training phase needs the plan's SecAgg+ settings")
    graph_seed = None
    if plan.reproducible_graph:
        graph_seed = derive_seed(plan.seed, "secagg-graph", task.round_num).to_bytes(32, "big")
    distributed = None if dp is None else dp.plan.distributed
    outcome = run_secure_round(
        transport,
        members,
        task,
        secure,
        numel=plan.update_numel,
        compression=plan.compression,
        graph_seed=graph_seed,
        noise_variance=0.0 if distributed is None else distributed.client_variance,
        distributed=distributed is not None,
    )
    updates = outcome.summed
    if updates is not None and dp is not None:
        updates = SummedUpdates(updates.total, dp.plan.denominator, updates.count)
    return Collected(
        updates,
        outcome.reports,
        outcome.accepted,
        outcome.failures,
        outcome.bytes_up,
        outcome.bytes_down,
        outcome.train_seconds,
        outcome.metrics,
    )


def failure(collected: Collected, *, dp_on: bool, min_clients: int) -> str | None:
    """Why the round fails (its adapter left as it was), or None. Under client-level DP (`dp_on`) every
    round releases its noised sum, so who answered changes no outcome; only a SecAgg+ abort fails it."""
    if collected.secagg is not None and collected.secagg.abort is not None:
        return f"{collected.secagg.abort}: the global adapter is left as it was"
    if dp_on:
        return None
    count = 0 if collected.updates is None else collected.updates.count
    if count < min_clients:
        return (
            f"{count} updates arrived, federation.min_clients = {min_clients}: the global adapter is left "
            "as it was"
        )
    return None
