"""An evaluation exchange, the same for a star's global adapter and a decentralized client's own.

`evaluate_on(transport, plan, round_num, adapter_for)` opens an evaluation round with the plan's
evaluation clients, sends each the adapter `adapter_for(member)` names (the global one, or the member's
own), takes back each client's own `EvalReport` (refusing another's, or one without the personal loss the
run's last evaluation asks for) and returns them in slot order, with the bytes sent to the clients that
received them and the messages the transport refused meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedtune.errors import Refusal
from fedtune.evaluate import ClientNll
from fedtune.round.messages import EvalReport, EvalRequest
from fedtune.round.plan import Member, RunPlan
from fedtune.round.transport import Exchange, Phase, Purpose, Transport


@dataclass(frozen=True)
class Evaluated:
    reports: tuple[EvalReport, ...]  # the evaluating clients that answered, in slot order
    bytes_down: int  # the adapters sent to the clients they reached
    refused: dict[str, int]  # messages the transport refused during the exchange, by kind

    @property
    def nll(self) -> list[ClientNll]:
        return [ClientNll(r.client_id, r.nll, r.tokens) for r in self.reports]

    @property
    def personal_nll(self) -> list[ClientNll]:
        return [ClientNll(r.client_id, r.personal_nll or 0.0, r.tokens) for r in self.reports]

    @property
    def any_tokens(self) -> bool:
        return any(r.tokens for r in self.reports)


def evaluate_on(
    transport: Transport,
    plan: RunPlan,
    round_num: int,
    adapter_for: Callable[[Member], torch.Tensor],
    *,
    personalize: bool = False,
) -> Evaluated:
    """The evaluation clients' reports on the adapters `adapter_for` gives them (see the module)."""
    members = [Member(slot, index, plan.population[index]) for slot, index in enumerate(plan.eval_members)]
    reports: dict[int, EvalReport] = {}

    def deliver(slot: int, reply: object) -> bool:
        if not isinstance(reply, EvalReport) or reply.client_id != members[slot].client_id:
            raise Refusal("malformed", "an evaluation takes the evaluating client's own report")
        if personalize and reply.personal_nll is None:
            raise Refusal("malformed", "the run's last evaluation takes the personal adapter's loss too")
        reports[slot] = reply
        return True

    messages = {m.slot: EvalRequest(round_num, adapter_for(m), m, personalize) for m in members}
    transport.open_round(round_num, Purpose.EVALUATE, members)
    try:
        done = transport.exchange(Exchange(Phase.EVALUATE, messages, deliver))
    finally:
        refused = dict(transport.close_round())
    return Evaluated(
        tuple(reports[slot] for slot in sorted(reports)),
        sum(messages[slot].nbytes() for slot in done.received),
        refused,
    )
