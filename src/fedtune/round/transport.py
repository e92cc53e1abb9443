"""The one thing simulation and deployment do differently: how the engine's messages reach participants.

A round is a sequence of exchanges. The engine opens the round with its members (`open_round`), then
for each phase hands the transport an `Exchange`: the message each member receives now and a `deliver`
callback for the replies. The transport returns once every addressed member has answered, the exchange's
`target` of taken replies is met, or (over a network) its deadline for that phase has passed; `Exchanged`
says who received, who answered, who came late and whose reply was refused. `close_round` ends the round
and returns the messages the transport refused on its own during it (malformed bytes, stale rounds...).

Phases: an evaluation round has one (`EVALUATE`); a plain training round one (`TRAIN`); a secure round
four (`ADVERTISE_KEYS`, `SHARE_KEYS`, `MASKED_INPUT`, where the clients train, and `UNMASK`). A transport
implements three methods and knows nothing of sampling, sums, privacy or metrics: `inprocess` hands
them to participants in the simulation (one after another, or to a pool of worker processes or Ray
actors: `round.executor`); `fedtune.transport.grpc_transport` serves them over gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from fedtune.errors import FedtuneError
from fedtune.round.plan import Member
from fedtune.secagg import Stage


class Purpose(Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"


class Phase(Enum):
    EVALUATE = "evaluate"
    TRAIN = "train"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"

    @property
    def secagg_stage(self) -> Stage | None:
        """The SecAgg+ stage this phase runs, None for the plain phases."""
        return _STAGES.get(self)

    @property
    def trains(self) -> bool:
        """Participants train in this phase (its replies are updates)."""
        return self in (Phase.TRAIN, Phase.MASKED_INPUT)


_STAGES = {
    Phase.ADVERTISE_KEYS: Stage.ADVERTISE_KEYS,
    Phase.SHARE_KEYS: Stage.SHARE_KEYS,
    Phase.MASKED_INPUT: Stage.MASKED_INPUT,
    Phase.UNMASK: Stage.UNMASK,
}


@dataclass(frozen=True, eq=False)
class Exchange:
    """One phase: `messages[slot]` goes to that member; each reply goes to `deliver(slot, reply)`, which
    returns False when the reply is not needed (the target was met: a straggler) and raises
    `fedtune.errors.Refusal` to refuse it."""

    phase: Phase
    messages: Mapping[int, Any]
    deliver: Callable[[int, Any], bool]
    target: int | None = None  # stop waiting once this many replies were taken


@dataclass(frozen=True)
class Exchanged:
    received: frozenset[int]  # slots whose message reached them
    answered: frozenset[int]  # slots whose reply was taken
    late: frozenset[int]  # slots that replied after the target was met
    refused: Mapping[int, str]  # slots whose reply was refused, with the reason
    seconds: float


class Transport(Protocol):
    def open_round(self, round_num: int, purpose: Purpose, members: Sequence[Member]) -> None:
        """Start a round with these members (a deployment waits here for enough clients to connect)."""
        ...

    def exchange(self, exchange: Exchange) -> Exchanged:
        """Run one phase of the open round."""
        ...

    def close_round(self, outcome: str | None = None) -> Mapping[str, int]:
        """End the round (`outcome`: why it ended early, for clients still waiting); the messages the
        transport refused by itself during it, counted by kind."""
        ...


class Interrupted(FedtuneError):
    """The transport was asked to stop (a server shutting down); the round in flight is not finished."""
