"""The coordinator's records, plain dataclasses: sessions, each member's assignment, the open round and
its open exchange, and what a client is told (`Offer`, `Wait`, `Done`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.round.messages import EvalRequest, SecureTrainRequest, TrainRequest
from fedtune.round.plan import Member
from fedtune.round.transport import Exchange, Purpose
from fedtune.secagg import Stage

SELECTED, SENT, SUBMITTED, REFUSED, STRAGGLER = "selected", "sent", "submitted", "refused", "straggler"
NONCE_BYTES = 16
SESSION_BYTES = 16
Task = TrainRequest | SecureTrainRequest | EvalRequest


@dataclass
class Session:
    client_id: str
    token: bytes
    last_seen: float
    num_examples: int
    told_done: bool = False


@dataclass
class Assignment:
    member: Member
    nonce: bytes
    status: str = SELECTED

    @property
    def slot(self) -> int:
        return self.member.slot


@dataclass(frozen=True, eq=False)
class Offer:
    """A member's first message of the round (its task), with its nonce and the round's deadline."""

    message: Task
    nonce: bytes
    deadline: float


@dataclass(frozen=True)
class Wait:
    retry_after_ms: int
    reason: str


@dataclass(frozen=True)
class Done:
    reason: str


@dataclass
class OpenExchange:
    exchange: Exchange
    deadline: float
    expected: set[int]  # slots the exchange waits for
    received: set[int] = field(default_factory=set)
    answered: set[int] = field(default_factory=set)
    late: set[int] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)
    opened_at: float = 0.0
    closed: bool = False

    @property
    def stage(self) -> Stage | None:
        return self.exchange.phase.secagg_stage


@dataclass
class OpenRound:
    round_num: int
    purpose: Purpose
    assignments: dict[str, Assignment]
    by_slot: dict[int, Assignment]
    deadline: float
    tasks: dict[int, Task] = field(default_factory=dict)  # the first exchange's messages: fetched as tasks
    exchange: OpenExchange | None = None  # the open (or last) exchange
    first: OpenExchange | None = None  # the exchange whose messages are the tasks
    secure: bool = False


@dataclass(frozen=True, eq=False)
class ClosedRound:
    round: OpenRound
    reason: str


class RoundOver(Exception):
    """A call of the round that just closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
