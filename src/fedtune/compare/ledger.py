"""How much each client trained in the federated run: the budget the other arms are matched to.

`StepLedger.watch` is given to the simulation as its `watch`: it sees every participant's replies (from
any executor) and adds each training submission's local steps to its client's count, whether the server
then took the update or not (it was trained). A secure round's submission is its masked input,
counted the same way.
"""

from __future__ import annotations

from fedtune.round.messages import Submission
from fedtune.round.plan import Member


class StepLedger:
    def __init__(self) -> None:
        self.steps: dict[str, int] = {}  # client id -> local steps trained, all rounds together
        self.rounds: dict[str, int] = {}  # client id -> rounds it trained in

    def add(self, client_id: str, steps: int) -> None:
        self.steps[client_id] = self.steps.get(client_id, 0) + steps
        self.rounds[client_id] = self.rounds.get(client_id, 0) + 1

    def watch(self, _member: Member, reply: object) -> None:
        if isinstance(reply, Submission):
            self.add(reply.report.client_id, reply.report.num_steps)

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())
