"""One SecAgg+ round over the network, server side: the protocol's state machine, its stage, and each
client's next message.

The state machine (`secagg.SecAggServer`) is the simulation's; this adds what a transport needs. Clients
send their stage messages whenever they are ready (`receive`, `masked`); the round loop closes a stage
when every client expected at it has answered, or at the stage's deadline (`complete`, `close_stage`),
and whoever has not answered by then has dropped, which the protocol recovers from as long as t remain.
A client learns the next message by polling (`poll`): it waits while the stage is open, receives its
message once the stage closed, and is told Done when it was left out or the round aborted. Everything here
runs under the coordinator's lock; no I/O. The neighbour graph is drawn from the OS, not the run seed.
"""

from __future__ import annotations

import grpc

from fedtune.config import SecureAggregationConfig
from fedtune.secagg import (
    FixedPoint,
    SecAggParams,
    SecAggServer,
    Stage,
    default_threshold,
    effective_neighbours,
)
from fedtune.secagg.encoding import DecodedSum, decode
from fedtune.secagg.errors import ProtocolViolation, SecAggAbort
from fedtune.secagg.graph import resolve_neighbours
from fedtune.transport import fedtune_v1_pb2 as pb
from fedtune.transport import secagg_wire as sw
from fedtune.transport.wire import WireError


def secure_params(
    cfg: SecureAggregationConfig, cohort: int, vector_size: int, max_weight: int, round_num: int
) -> SecAggParams:
    """The round's public parameters, resolved as the simulation's `SecAggRound` resolves them."""
    k = effective_neighbours(resolve_neighbours(cfg.neighbours, cohort), cohort)
    t = default_threshold(k) if cfg.threshold == "auto" else cfg.threshold
    spec = FixedPoint(cfg.bits, cfg.clip_range, max_weight, cohort)
    return SecAggParams(round_num, vector_size, t, k, spec)


def setup_message(params: SecAggParams, slot: int) -> pb.SecAggSetup:
    spec = params.encoding
    return pb.SecAggSetup(
        slot=slot,
        cohort=spec.max_clients,
        threshold=params.threshold,
        neighbours=params.neighbours,
        bits=spec.bits,
        clip_range=spec.clip_range,
        max_weight=spec.max_weight,
        vector_size=params.vector_size,
    )


def params_from_setup(setup: pb.SecAggSetup, round_num: int) -> SecAggParams:
    """The client's copy of the round's parameters, from its task."""
    spec = FixedPoint(int(setup.bits), float(setup.clip_range), int(setup.max_weight), int(setup.cohort))
    return SecAggParams(round_num, int(setup.vector_size), int(setup.threshold), int(setup.neighbours), spec)


def _refused(exc: ProtocolViolation) -> WireError:
    return WireError("protocol", str(exc), grpc.StatusCode.FAILED_PRECONDITION)


class SecureRound:
    def __init__(self, params: SecAggParams, cohort: int) -> None:
        self.params = params
        self.server = SecAggServer(params, range(cohort))  # graph_seed None: drawn from the OS
        self.stage = Stage.ADVERTISE_KEYS
        self.expected: set[int] = set(range(cohort))
        self.answered: set[int] = set()
        self.outbox: dict[int, object] = {}
        self.abort: str | None = None
        self.decoded: DecodedSum | None = None
        self.included: tuple[int, ...] = ()

    @property
    def words(self) -> int:
        return self.params.payload_words

    def receive(self, slot: int, request: pb.SecAggRequest) -> None:
        """A client's stage message (keys, shares, unmasking shares) into the state machine."""
        kind = request.WhichOneof("stage")
        rnd = self.params.round_id
        try:
            if kind == "advertise":
                self.server.receive_keys(sw.advertise_from_pb(request.advertise, rnd, slot))
            elif kind == "share":
                self.server.receive_shares(sw.share_keys_from_pb(request.share, rnd, slot))
            elif kind == "unmask":
                self.server.receive_unmask(sw.unmask_from_pb(request.unmask, rnd, slot))
            else:
                raise WireError("malformed", f"a SecAgg request must carry a stage message, not {kind}")
        except ProtocolViolation as exc:
            raise _refused(exc) from None
        self.answered.add(slot)

    def masked(self, slot: int, data: bytes | bytearray) -> None:
        """A client's masked input (stage 2): added to the running sum, O(update) whatever the cohort."""
        try:
            self.server.receive_masked_input(
                sw.masked_input_from_words(data, self.words, self.params.round_id, slot)
            )
        except ProtocolViolation as exc:
            raise _refused(exc) from None
        self.answered.add(slot)

    def declined(self, slot: int) -> None:
        """The client will send no masked input this round (it refused its own update): a stage-2 dropout."""
        self.answered.add(slot)

    def poll(self, slot: int, stage: int) -> pb.SecAggReply:
        """What a client waiting for the message that opens `stage` is told now."""
        if self.abort is not None:
            return pb.SecAggReply(done=pb.Done(reason=f"the round aborted: {self.abort}"))
        if stage < self.stage or (stage == self.stage and slot not in self.outbox):
            return pb.SecAggReply(done=pb.Done(reason="left out of this round's secure sum (it dropped)"))
        if stage > self.stage:
            return pb.SecAggReply(wait=pb.Wait(retry_after_ms=50, reason=f"stage {self.stage.label} is open"))
        return sw.to_reply(self.outbox[slot])

    def complete(self) -> bool:
        """Every client expected at the open stage has answered (or the round is over)."""
        return self.abort is not None or self.expected <= self.answered

    def close_stage(self) -> None:
        """Close the open stage; the next messages go to the outbox. An abort is kept, with its reason."""
        if self.abort is not None:
            return
        try:
            if self.stage == Stage.ADVERTISE_KEYS:
                self.outbox = dict(self.server.close_advertise())
            elif self.stage == Stage.SHARE_KEYS:
                self.outbox = dict(self.server.close_share_keys())
            elif self.stage == Stage.MASKED_INPUT:
                self.outbox = dict(self.server.close_masked_input())
            else:
                total = self.server.finish()
                self.included = total.survivors
                self.decoded = decode(total.words, self.params.encoding)
                self.outbox = {}
        except SecAggAbort as exc:
            self.abort = str(exc)
            return
        self.expected, self.answered = set(self.outbox), set()
        if self.stage < Stage.UNMASK:
            self.stage = Stage(self.stage + 1)

    def metrics(self) -> dict[str, object]:
        if self.abort is not None:
            return {"secagg_abort": self.abort, "secagg_survivors": list(self.server.survivors_per_stage)}
        assert self.decoded is not None
        return {
            "secagg_survivors": list(self.server.survivors_per_stage),
            "secagg_neighbours": self.params.neighbours,
            "secagg_threshold": self.params.threshold,
            "secagg_clipped": self.decoded.clipped,
        }
