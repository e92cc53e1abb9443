"""A SecAgg+ round through a transport: four exchanges over the one stage driver, then the decoded sum.

The engine hands each selected client its task with the round's public parameters (`ADVERTISE_KEYS`: the
client answers with its keys), forwards the neighbours' keys (`SHARE_KEYS`: sealed shares come back),
forwards the shares (`MASKED_INPUT`: the client trains, encodes and masks; the server adds each masked
input to a running sum, O(update) whatever the cohort), and asks the survivors for what removes the masks
(`UNMASK`). `SecAggStages` decides who is expected at each stage and closes it; a transport only moves the
messages. Fewer than the threshold at any stage aborts the round, with the reason.

The unmasked words decode to the weighted sum of the included updates (distributed DP: a centred decode
of a sum that holds every client's noise share); random-k puts it back on the round's coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.aggregate import SummedUpdates
from fedtune.compress import CompressionSpec, num_kept, scatter_shared
from fedtune.errors import Refusal
from fedtune.privacy.distributed import decode_noised_sum
from fedtune.round.collect import submission
from fedtune.round.messages import ClientReport, MaskedUpdate, SecureTrainRequest, TrainTask
from fedtune.round.plan import Member, SecureSettings
from fedtune.round.results import SecAggMetrics
from fedtune.round.transport import Exchange, Phase, Transport
from fedtune.secagg import ProtocolViolation, SecAggStages
from fedtune.secagg.fixedpoint import decode
from fedtune.secagg.messages import MaskedInput

_LATER_PHASES = (Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASK)


@dataclass(frozen=True, eq=False)
class SecureOutcome:
    summed: SummedUpdates | None  # None when the round aborted
    reports: dict[int, ClientReport]  # every submission's report
    accepted: dict[int, ClientReport]  # slots whose masked input was taken into the sum
    failures: dict[int, tuple[str, str]]  # slot -> (client id, reason)
    metrics: SecAggMetrics
    bytes_up: int
    bytes_down: int
    train_seconds: float


def _protocol(deliver: Callable[[int, object], None]) -> Callable[[int, object], bool]:
    def taken(slot: int, reply: object) -> bool:
        try:
            deliver(slot, reply)
        except ProtocolViolation as exc:
            raise Refusal("protocol", str(exc)) from None
        return True

    return taken


def run_secure_round(
    transport: Transport,
    members: Sequence[Member],
    task: TrainTask,
    settings: SecureSettings,
    *,
    numel: int,
    compression: CompressionSpec,
    graph_seed: bytes | None,
    noise_variance: float = 0.0,
    distributed: bool = False,
) -> SecureOutcome:
    """One secure round among `members` (slots 0..n-1), already opened on the transport."""
    shared = task.shared_seed
    vector_size = numel if shared is None else num_kept(numel, compression.fraction)
    params = settings.params(task.round_num, len(members), vector_size)
    stages = SecAggStages(params, [m.slot for m in members], graph_seed=graph_seed)
    reports: dict[int, ClientReport] = {}
    accepted: dict[int, ClientReport] = {}
    failures: dict[int, tuple[str, str]] = {}

    def masked(slot: int, reply: object) -> None:
        sub = submission(reply)
        reports[slot] = sub.report
        if sub.update is None:
            failures[slot] = (sub.report.client_id, sub.report.error or "refused by the client")
            stages.declined(slot)
            return
        if not isinstance(sub.update, MaskedUpdate):
            failures[slot] = (sub.report.client_id, "an update in the clear in a secure round")
            raise Refusal("wrong_encoding", "this round runs through secure aggregation: send a masked input")
        stages.receive(slot, MaskedInput(params.round_id, slot, sub.update.words))
        accepted[slot] = sub.report

    opening = {m.slot: SecureTrainRequest(task, m, params, noise_variance) for m in members}
    first = transport.exchange(Exchange(Phase.ADVERTISE_KEYS, opening, _protocol(stages.receive)))
    adapter_down = sum(opening[slot].nbytes() for slot in first.received)
    stages.close_stage()
    train_seconds = 0.0
    for phase in _LATER_PHASES:
        if stages.failure is not None:
            break
        deliver = _protocol(masked if phase == Phase.MASKED_INPUT else stages.receive)
        done = transport.exchange(Exchange(phase, dict(stages.outbox), deliver))
        for slot in done.received:
            stages.delivered(slot)
        if phase == Phase.MASKED_INPUT:
            train_seconds = done.seconds
        stages.close_stage()
    ledger = stages.ledger()
    up, down = sum(ledger.bytes_up.values()), sum(ledger.bytes_down.values())
    summed, clipped, excluded = None, None, None
    result = stages.result
    if result is not None:
        words = result.words
        clipped, excluded = int(words[-1]), len(result.excluded)
        if distributed:
            noised = decode_noised_sum(words, params.encoding)
            total, weight = noised.total, noised.contributors
        else:
            decoded = decode(words, params.encoding)
            total, weight = decoded.total, decoded.total_weight
        values = torch.from_numpy(np.ascontiguousarray(total, dtype=np.float64))
        if shared is not None:
            values = scatter_shared(values, numel=numel, spec=compression, shared_seed=shared)
        summed = SummedUpdates(values, float(weight), len(result.survivors))
    metrics = SecAggMetrics(
        survivors=stages.survivors_per_stage,
        neighbours=params.neighbours if result is None else result.neighbours,
        threshold=params.threshold,
        excluded=excluded,
        clipped=clipped,
        bytes_up_per_client=up / len(members),
        bytes_down_per_client=down / len(members),
        server_seconds=ledger.server_seconds,
        abort=stages.abort,
    )
    return SecureOutcome(summed, reports, accepted, failures, metrics, up, down + adapter_down, train_seconds)
