"""Who computes a simulated round's replies: the participants one after another in this process
(`SerialExecutor`), or several at once in worker processes or Ray actors (`round.pool`).

The simulation's transport (`round.inprocess`) hands an executor one phase's messages by slot and takes
the replies as they come; it delivers them to the engine in slot order whatever the completion order, so
a sum adds the same floats in the same order with any executor. A client whose worker died answers
`Lost` instead: the transport reports it as a failed client of a training phase, and as silent in the
others (a secure round then recovers from it as from any dropout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from fedtune.round.plan import Member
from fedtune.round.transport import Phase


class Responder(Protocol):
    def respond(self, message: object) -> object: ...


@dataclass(frozen=True)
class Lost:
    """The stand-in reply of a client whose worker died before it answered."""

    reason: str


class Executor(Protocol):
    def open_round(self, round_num: int, members: Mapping[int, Member]) -> None:
        """A round begins with these members, by slot."""
        ...

    def run(
        self, phase: Phase, messages: Mapping[int, object], started: Callable[[int], None]
    ) -> Iterator[tuple[int, object]]:
        """Each slot's reply (or `Lost`) as it is computed; `started(slot)` just before its work begins."""
        ...

    def close_round(self) -> None:
        """The round is over: what its participants held (secure-round secrets) is dropped."""
        ...

    def close(self) -> None:
        """The run is over: stop any worker."""
        ...


class SerialExecutor:
    """The participants one after another, on the one shared model in this process."""

    def __init__(self, participant_for: Callable[[Member], Responder]) -> None:
        """`participant_for(member)` makes a round's participant when its first message arrives."""
        self.participant_for = participant_for
        self._members: Mapping[int, Member] = {}
        self._participants: dict[int, Responder] = {}

    def open_round(self, round_num: int, members: Mapping[int, Member]) -> None:
        self._members, self._participants = members, {}

    def run(
        self, phase: Phase, messages: Mapping[int, object], started: Callable[[int], None]
    ) -> Iterator[tuple[int, object]]:
        for slot, message in messages.items():
            participant = self._participants.get(slot)
            if participant is None:
                participant = self._participants[slot] = self.participant_for(self._members[slot])
            started(slot)
            yield slot, participant.respond(message)

    def close_round(self) -> None:
        self._participants = {}

    def close(self) -> None:
        self._participants = {}
