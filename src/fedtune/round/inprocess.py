"""The simulation's transport: the engine's messages go to participants as objects, through an executor.

Serial (`round.executor.SerialExecutor`): a round's participants are made when their first message
arrives (`participant_for(member)`: the simulation builds one over the shared model, the client's data and
the engine's client-state store) and dropped when the round closes, so memory holds one round's
participants, never the population's; nothing is copied. A pool (`round.pool`): worker processes or Ray
actors train several clients at once. Either way a reply goes to the exchange's `deliver` in slot order
as soon as it and the slots before it are in: a FedAvg or secure sum holds one update at a time serially,
a few more with a pool, and adds them in the same order, so a run's adapter does not depend on which
worker finished first. A client whose worker died is a failed client of its training phase.

`SeededDropouts` simulates clients dropping out of a secure round (`secure_aggregation.dropout_rate`): a
client drops at the first stage whose seeded draw falls below the rate, and hears nothing from then on.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from fedtune.errors import Refusal
from fedtune.round.executor import Executor, Lost, Responder, SerialExecutor
from fedtune.round.messages import ClientReport, Submission
from fedtune.round.plan import Member
from fedtune.round.transport import Exchange, Exchanged, Phase, Purpose
from fedtune.secagg import Stage
from fedtune.seeding import numpy_rng


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
    """The simulation's transport over an executor: serial by default (`participant_for`), or a pool of
    workers (`executor`)."""

    def __init__(
        self,
        participant_for: Callable[[Member], Responder] | None = None,
        *,
        executor: Executor | None = None,
        dropouts: Dropouts | None = None,
        on_work: Callable[[int, str, Phase], None] = lambda _round, _client, _phase: None,
        watch: Callable[[Member, object], None] = lambda _member, _reply: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`on_work(round, client_id, phase)` is told as a participant starts to train or evaluate
        (progress); `watch(member, reply)` sees every reply before the engine does (`fedtune compare`
        counts the steps trained)."""
        if (participant_for is None) == (executor is None):
            raise ValueError("give participant_for (serial) or an executor, not both")
        self.executor = executor if executor is not None else SerialExecutor(participant_for)  # type: ignore[arg-type]
        self.dropouts = dropouts
        self.on_work = on_work
        self.watch = watch
        self.clock = clock
        self._round = 0
        self._members: dict[int, Member] = {}

    def open_round(self, round_num: int, purpose: Purpose, members: Sequence[Member]) -> None:
        self._round = round_num
        self._members = {m.slot: m for m in members}
        self.executor.open_round(round_num, self._members)

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
        start, phase = self.clock(), exchange.phase
        sent = {s: m for s, m in sorted(exchange.messages.items()) if not self._dropped(s, phase)}
        answered: set[int] = set()
        late: set[int] = set()
        refused: dict[int, str] = {}
        order = deque(sent)  # replies reach the engine in slot order, whoever finished first
        ready: dict[int, object] = {}

        def started(slot: int) -> None:
            if phase.trains or phase == Phase.EVALUATE:
                self.on_work(self._round, self._members[slot].client_id, phase)

        for slot, reply in self.executor.run(phase, sent, started):
            ready[slot] = reply
            while order and order[0] in ready:
                now = order.popleft()
                reply = self._stand_in(now, phase, ready.pop(now))
                if reply is None:
                    continue  # lost outside a training phase: silent, like a dropout
                self.watch(self._members[now], reply)
                try:
                    taken = exchange.deliver(now, reply)
                except Refusal as refusal:
                    refused[now] = refusal.detail
                    continue
                (answered if taken else late).add(now)
        return Exchanged(frozenset(sent), frozenset(answered), frozenset(late), refused, self.clock() - start)

    def _stand_in(self, slot: int, phase: Phase, reply: object) -> object | None:
        """A lost client's reply: a failed submission in a training phase, none in the others."""
        if not isinstance(reply, Lost):
            return reply
        if not phase.trains:
            return None
        report = ClientReport(self._members[slot].client_id, 0, 0, math.nan, error=reply.reason)
        return Submission(report, None)

    def close_round(self, outcome: str | None = None) -> Mapping[str, int]:
        self.executor.close_round()
        return {}

    def close(self) -> None:
        """Stop the executor's workers (the run is over)."""
        self.executor.close()
