"""The simulated clock: how long a round would take on heterogeneous clients, and who misses its deadline.

FedScale's model, per selected client of a training round, from the round's start: download seconds (the
task's bytes over the client's download link), compute seconds (`seconds_per_example` x batch size x the
steps it took), upload seconds (its submission's bytes over its upload link); transfer time is
bytes x 8 / (Mbit/s x 1e6). A client offline this round (its `availability` draw) never hears of it.
With `federation.round_deadline_s`, a reply that would finish after the deadline is not delivered: the
client trained (its site would have) but the server has moved on, so it is a straggler, and in a secure
round a dropout at the masked-input stage, which SecAgg+ recovers from as from any other. A round lasts
as long as its slowest delivered client, or the deadline when a selected client's reply did not arrive
(late, offline, or dropped from a secure round: the server cannot tell them apart, so it waits the
deadline out; with no deadline it is taken to know).

`SimulatedClock` wraps the in-process transport and changes only who is addressed and which replies
arrive; the training itself is untouched, so with no profiles and no deadline a run is bit-identical.
Only a training round's adapter download and training reply are timed (SecAgg+'s key and share
messages are small and not timed); evaluation is a measurement of the global adapter, not timed, and
every evaluation client takes part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedtune.round.messages import Submission
from fedtune.round.plan import Member
from fedtune.round.profiles import ClientProfile, online
from fedtune.round.results import ClientTiming, RoundTiming
from fedtune.round.transport import Exchange, Exchanged, Phase, Purpose, Transport

_TASK_PHASES = (Phase.TRAIN, Phase.ADVERTISE_KEYS)  # the phases that send a client the adapter


def transfer_seconds(nbytes: int, mbps: float) -> float:
    """Seconds to move `nbytes` over a link of `mbps` megabits per second (0 on an infinite one)."""
    return 0.0 if math.isinf(mbps) else nbytes * 8 / (mbps * 1e6)


def compute_seconds(seconds_per_example: float, batch_size: int, steps: int) -> float:
    """FedScale's compute time: per-example latency x examples per step x steps."""
    return seconds_per_example * batch_size * steps


def round_seconds(clients: Mapping[str, ClientTiming], deadline_s: float | None) -> float:
    """The round's duration: its slowest delivered client, or the deadline when a client was cut."""
    delivered = [t.finish_s for t in clients.values() if t.delivered]
    cut = not all(t.delivered for t in clients.values())
    if deadline_s is not None and cut:
        return deadline_s
    return max(delivered, default=0.0)


class SimulatedClock:
    """A transport that puts a simulated clock on another (the in-process one): see the module doc."""

    def __init__(
        self,
        inner: Transport,
        profiles: Mapping[str, ClientProfile],
        *,
        batch_size: int,
        seed: int,
        deadline_s: float | None = None,
    ) -> None:
        self.inner = inner
        self.profiles = profiles
        self.batch_size = batch_size
        self.seed = seed
        self.deadline_s = deadline_s
        self.total_seconds = 0.0
        self.rounds: dict[int, RoundTiming] = {}
        self._round = 0
        self._purpose = Purpose.EVALUATE
        self._members: dict[int, Member] = {}
        self._online: dict[int, bool] = {}
        self._down: dict[int, float] = {}
        self._timed: dict[int, ClientTiming] = {}

    def profile(self, client_id: str) -> ClientProfile:
        return self.profiles.get(client_id) or ClientProfile(client_id)

    def timing(self, round_num: int) -> RoundTiming:
        """The round's timing (a round that trained nothing, like round 0, took no simulated time)."""
        return self.rounds.get(round_num) or RoundTiming(0.0, self.total_seconds, {})

    def open_round(self, round_num: int, purpose: Purpose, members: Sequence[Member]) -> None:
        self._round, self._purpose = round_num, purpose
        self._members = {m.slot: m for m in members}
        self._online = {m.slot: online(self.profile(m.client_id), round_num, self.seed) for m in members}
        self._down, self._timed = {}, {}
        self.inner.open_round(round_num, purpose, members)

    def exchange(self, exchange: Exchange) -> Exchanged:
        if self._purpose is not Purpose.TRAIN:
            return self.inner.exchange(exchange)
        messages = {slot: m for slot, m in exchange.messages.items() if self._online[slot]}
        if exchange.phase in _TASK_PHASES:
            for slot, message in messages.items():
                link = self.profile(self._members[slot].client_id).download_mbps
                self._down[slot] = transfer_seconds(message.nbytes(), link)
        deliver = self._clocked(exchange.deliver) if exchange.phase.trains else exchange.deliver
        return self.inner.exchange(Exchange(exchange.phase, messages, deliver, exchange.target))

    def _clocked(self, deliver: Callable[[int, Any], bool]) -> Callable[[int, Any], bool]:
        def clocked(slot: int, reply: Any) -> bool:
            if not isinstance(reply, Submission):
                return deliver(slot, reply)  # malformed: the engine refuses it
            profile = self.profile(self._members[slot].client_id)
            down = self._down.get(slot, 0.0)
            compute = compute_seconds(profile.seconds_per_example, self.batch_size, reply.report.num_steps)
            up = transfer_seconds(reply.nbytes(), profile.upload_mbps)
            late = self.deadline_s is not None and down + compute + up > self.deadline_s
            self._timed[slot] = ClientTiming(True, not late, down, compute, up, late)
            return False if late else deliver(slot, reply)

        return clocked

    def close_round(self, outcome: str | None = None) -> Mapping[str, int]:
        if self._purpose is Purpose.TRAIN:
            clients = {}
            for slot, member in sorted(self._members.items()):
                timed = self._timed.get(slot)
                if timed is None:  # offline, or out of a secure round before it trained
                    timed = ClientTiming(self._online[slot], False, self._down.get(slot, 0.0), 0.0, 0.0)
                clients[member.client_id] = timed
            seconds = round_seconds(clients, self.deadline_s)
            self.total_seconds += seconds
            self.rounds[self._round] = RoundTiming(seconds, self.total_seconds, clients)
        return self.inner.close_round(outcome)
