"""How much each client trained in the federated run: the budget the other arms are matched to.

`StepLedger.wrap` is given to the simulation as its `responder`: every participant's answers pass through
and each training submission's local steps are added to its client's count, whether the server then took
the update or not (it was trained). A secure round's submission is its masked input, counted the same way.
"""

from __future__ import annotations

from fedtune.round.inprocess import Responder
from fedtune.round.messages import Submission
from fedtune.round.plan import Member


class _Counted:
    def __init__(self, inner: Responder, ledger: StepLedger) -> None:
        self.inner = inner
        self.ledger = ledger

    def respond(self, message: object) -> object:
        reply = self.inner.respond(message)
        if isinstance(reply, Submission):
            self.ledger.add(reply.report.client_id, reply.report.num_steps)
        return reply


class StepLedger:
    def __init__(self) -> None:
        self.steps: dict[str, int] = {}  # client id -> local steps trained, all rounds together
        self.rounds: dict[str, int] = {}  # client id -> rounds it trained in

    def add(self, client_id: str, steps: int) -> None:
        self.steps[client_id] = self.steps.get(client_id, 0) + steps
        self.rounds[client_id] = self.rounds.get(client_id, 0) + 1

    def wrap(self, _member: Member, participant: Responder) -> Responder:
        return _Counted(participant, self)

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())
