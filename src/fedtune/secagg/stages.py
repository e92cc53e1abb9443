"""The server's side of one SecAgg+ round, stage by stage: the one driver every transport uses.

`SecAggServer` is the protocol's pure state machine; this adds what moving its messages needs. The round
engine opens each stage by handing the transport `outbox` (the message each client receives now), feeds
every reply to `receive` as it arrives, and calls `close_stage` once every client expected at the stage has
answered (`complete`) or the transport's deadline passed; whoever has not answered by then has dropped,
which the protocol recovers from as long as t remain. Below t, `close_stage` records the reason in
`abort` and the round is over. Messages are the protocol's dataclasses (`secagg.messages`): the in-process
transport passes them as they are, the gRPC one converts them at its edge.

The driver also keeps the round's ledger: the bytes each client sent and received (the messages' own
sizes, the same whatever carries them) and the seconds the server spent in the protocol. No I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from fedtune.secagg.errors import ProtocolViolation, SecAggAbort
from fedtune.secagg.messages import AdvertiseKeys, MaskedInput, ShareKeys, Stage, UnmaskResponse
from fedtune.secagg.params import SecAggParams
from fedtune.secagg.server import SecAggServer, UnmaskedSum

Reply = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse
_EXPECTED = {
    Stage.ADVERTISE_KEYS: AdvertiseKeys,
    Stage.SHARE_KEYS: ShareKeys,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.UNMASK: UnmaskResponse,
}


@dataclass(frozen=True)
class StageLedger:
    """What the round cost: bytes per client (by slot) and the server's seconds in the protocol."""

    bytes_up: Mapping[int, int]
    bytes_down: Mapping[int, int]
    server_seconds: float


class SecAggStages:
    """One round over clients `slots`; `graph_seed` None draws the neighbour graph from the OS."""

    def __init__(self, params: SecAggParams, slots: Iterable[int], *, graph_seed: bytes | None = None):
        self.params = params
        self.slots = tuple(slots)
        self.server = SecAggServer(params, self.slots, graph_seed=graph_seed)
        self.stage = Stage.ADVERTISE_KEYS
        self.expected: set[int] = set(self.slots)
        self.answered: set[int] = set()
        self.outbox: dict[int, object] = {}  # the messages that open the current stage (none for stage 0)
        self.failure: SecAggAbort | None = None
        self.result: UnmaskedSum | None = None
        self._up = dict.fromkeys(self.slots, 0)
        self._down = dict.fromkeys(self.slots, 0)
        self._server_seconds = 0.0

    @property
    def abort(self) -> str | None:
        """Why the round aborted (too few clients survived a stage), or None."""
        return None if self.failure is None else str(self.failure)

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._server_seconds += time.perf_counter() - start

    def receive(self, slot: int, message: Reply) -> None:
        """A client's message for the open stage; `ProtocolViolation` refuses it (nothing changes)."""
        if slot not in self.expected or slot in self.answered:
            raise ProtocolViolation(f"client {slot} has no {self.stage.label} message to send now")
        expected = _EXPECTED[self.stage]
        if not isinstance(message, expected):
            raise ProtocolViolation(
                f"a {type(message).__name__} during stage {self.stage.label}; expected {expected.__name__}"
            )
        if message.sender != slot:
            raise ProtocolViolation(f"client {slot} sent a message signed by client {message.sender}")
        with self._timed():
            if isinstance(message, AdvertiseKeys):
                self.server.receive_keys(message)
            elif isinstance(message, ShareKeys):
                self.server.receive_shares(message)
            elif isinstance(message, MaskedInput):
                self.server.receive_masked_input(message)
            else:
                self.server.receive_unmask(message)
        self._up[slot] += message.nbytes()
        self.answered.add(slot)

    def declined(self, slot: int) -> None:
        """The client sends nothing at this stage (it refused its own update): it has dropped."""
        if slot in self.expected:
            self.answered.add(slot)

    def delivered(self, slot: int) -> None:
        """The transport handed `slot` its message of the open stage (counted in its bytes down)."""
        message = self.outbox.get(slot)
        if message is not None:
            self._down[slot] += message.nbytes()  # type: ignore[attr-defined]

    def complete(self) -> bool:
        """Every client expected at the open stage has answered (or the round is over)."""
        return self.abort is not None or self.result is not None or self.expected <= self.answered

    def close_stage(self) -> None:
        """Close the open stage; the next stage's messages go to `outbox`. An abort is kept, with its
        reason; after the unmasking stage `result` holds the unmasked sum."""
        if self.failure is not None or self.result is not None:
            return
        try:
            with self._timed():
                if self.stage == Stage.ADVERTISE_KEYS:
                    self.outbox = dict(self.server.close_advertise())
                elif self.stage == Stage.SHARE_KEYS:
                    self.outbox = dict(self.server.close_share_keys())
                elif self.stage == Stage.MASKED_INPUT:
                    self.outbox = dict(self.server.close_masked_input())
                else:
                    self.result = self.server.finish()
                    self.outbox = {}
        except SecAggAbort as exc:
            self.failure, self.outbox = exc, {}
            return
        self.expected, self.answered = set(self.outbox), set()
        if self.stage < Stage.UNMASK:
            self.stage = Stage(self.stage + 1)

    @property
    def survivors_per_stage(self) -> tuple[int, ...]:
        return self.server.survivors_per_stage

    def ledger(self) -> StageLedger:
        return StageLedger(dict(self._up), dict(self._down), self._server_seconds)
