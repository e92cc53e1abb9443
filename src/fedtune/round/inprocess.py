"""The simulation's transport: participants are calls on the one shared model, one after another.

A round's participants are made when their first message arrives (`participant_for(member)`: the
simulation builds one over the shared model, the client's data and the engine's client-state store) and
dropped when the round closes, so memory holds one round's participants, never the population's. A
reply goes to the exchange's `deliver` as soon as the participant has computed it: a FedAvg or secure sum
then holds one update at a time. Nothing is copied: the messages are the engine's objects.

`SeededDropouts` simulates clients dropping out of a secure round (`secure_aggregation.dropout_rate`): a
client drops at the first stage whose seeded draw falls below the rate, and hears nothing from then on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from fedtune.errors import Refusal
from fedtune.round.plan import Member
from fedtune.round.transport import Exchange, Exchanged, Phase, Purpose
from fedtune.secagg import Stage
from fedtune.seeding import numpy_rng


class Responder(Protocol):
    def respond(self, message: object) -> object: ...


class Dropouts(Protocol):
    def stage(self, round_num: int, member: Member, cohort: int) -> Stage | None:
        """The secure stage at which this member drops, or None."""
        ...

    def evaluates(self, round_num: int, client_id: str) -> bool:
        """Whether the client is there to evaluate the adapter of `round_num`."""
        ...


class SeededDropouts:
    """Each member drops at each secure stage with probability `rate`, from the run seed's stream."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.seed = seed
        self._drawn: dict[tuple[int, int], list[Stage | None]] = {}

    def stage(self, round_num: int, member: Member, cohort: int) -> Stage | None:
        if self.rate <= 0:
            return None
        key = (round_num, cohort)
        if key not in self._drawn:
            draws = numpy_rng(self.seed, "secagg-dropout", round_num).random((cohort, len(Stage)))
            drops = draws < self.rate
            self._drawn = {key: [Stage(int(row.argmax())) if row.any() else None for row in drops]}
        return self._drawn[key][member.slot]

    def evaluates(self, round_num: int, client_id: str) -> bool:
        return True  # a drop is one stage's: the client is back to evaluate


class ExplicitDropouts:
    """Named clients drop at a named stage of a named round and are gone for the rest of it, its
    evaluation included (tests, and what-if studies)."""

    def __init__(self, drops: Mapping[tuple[int, str], Stage]) -> None:
        self.drops = dict(drops)  # (round, client id) -> the stage it drops at

    def stage(self, round_num: int, member: Member, cohort: int) -> Stage | None:
        return self.drops.get((round_num, member.client_id))

    def evaluates(self, round_num: int, client_id: str) -> bool:
        return (round_num, client_id) not in self.drops  # gone for the rest of the round it dropped in


class InProcessTransport:
    def __init__(
        self,
        participant_for: Callable[[Member], Responder],
        *,
        dropouts: Dropouts | None = None,
        on_work: Callable[[int, str, Phase], None] = lambda _round, _client, _phase: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`on_work(round, client_id, phase)` is told before a participant trains or evaluates (progress)."""
        self.participant_for = participant_for
        self.dropouts = dropouts
        self.on_work = on_work
        self.clock = clock
        self._round = 0
        self._members: dict[int, Member] = {}
        self._participants: dict[int, Responder] = {}

    def open_round(self, round_num: int, purpose: Purpose, members: Sequence[Member]) -> None:
        self._round = round_num
        self._members = {m.slot: m for m in members}
        self._participants = {}

    def _dropped(self, slot: int, phase: Phase) -> bool:
        if self.dropouts is None:
            return False
        if phase == Phase.EVALUATE:
            return not self.dropouts.evaluates(self._round, self._members[slot].client_id)
        stage = phase.secagg_stage
        if stage is None:
            return False
        at = self.dropouts.stage(self._round, self._members[slot], len(self._members))
        return at is not None and at <= stage

    def exchange(self, exchange: Exchange) -> Exchanged:
        start = self.clock()
        received: set[int] = set()
        answered: set[int] = set()
        late: set[int] = set()
        refused: dict[int, str] = {}
        for slot, message in exchange.messages.items():
            if self._dropped(slot, exchange.phase):
                continue
            member = self._members[slot]
            received.add(slot)
            participant = self._participants.get(slot)
            if participant is None:
                participant = self._participants[slot] = self.participant_for(member)
            if exchange.phase.trains or exchange.phase == Phase.EVALUATE:
                self.on_work(self._round, member.client_id, exchange.phase)
            reply = participant.respond(message)
            try:
                taken = exchange.deliver(slot, reply)
            except Refusal as refusal:
                refused[slot] = refusal.detail
                continue
            (answered if taken else late).add(slot)
        return Exchanged(
            frozenset(received), frozenset(answered), frozenset(late), refused, self.clock() - start
        )

    def close_round(self, outcome: str | None = None) -> Mapping[str, int]:
        self._participants = {}
        return {}
