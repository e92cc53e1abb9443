"""A site's side of the gRPC transport: join, fetch tasks, let the participant answer, send its replies.

The site connects out (no inbound port). `take_part` joins (the server sends the run's config, from which
the site builds its participant once), then asks for work until the run is done. A training task goes to
the participant as the engine's `TrainRequest`, its `Submission` streams back as an update; an evaluation
task becomes an `EvalReport`; a secure task runs the SecAgg+ stages, each stage message fetched by polling
(`Wait` while the stage is not open, `Done` when this client was left out or the round is over). The
participant is the simulation's (`round.participant`): only these calls differ.

When the server is away the site retries with exponential backoff and jitter; when it comes back without
the session (a restart) the site joins again, and a task for a round it already trained is answered from
the state it had before that round (`round.state`), so the update is the same.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from fedtune.errors import FedtuneError
from fedtune.round.messages import EvalReport, SecureTrainRequest, Submission
from fedtune.secagg import Stage
from fedtune.transport import convert
from fedtune.transport import fedtune_v2_pb2 as pb
from fedtune.transport import secagg_wire as sw
from fedtune.transport.channel import Stub
from fedtune.transport.site_tls import TlsProblem
from fedtune.transport.wire import PROTOCOL_VERSION, chunked, float32_values

log = logging.getLogger("fedtune.client")
# the server is away, restarting (CANCELLED: it shut down mid-call), or still holds our old session
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ALREADY_EXISTS,
}
CALL_TIMEOUT_S = 120.0


class ClientError(FedtuneError):
    """The server refused this client for good (not on the allow-list, wrong identity or version)."""


class Responder(Protocol):
    """What a site's participant does (`round.participant.Participant`)."""

    def respond(self, message: object) -> object: ...


@dataclass(frozen=True)
class SiteRun:
    """What a site built once it knew the run: its participant, and the settings it takes part with."""

    participant: Responder
    adapter_numel: int
    chunk_bytes: int
    train_examples: int


@dataclass
class ClientResult:
    rounds_trained: int
    reason: str  # why the client stopped


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped; `give_up_after_s` of continuous failure ends it."""

    initial_s: float = 0.2
    max_s: float = 5.0
    give_up_after_s: float = 600.0
    _failing_since: float | None = None
    _attempt: int = 0
    _jitter: random.Random = field(default_factory=random.Random)  # timing jitter only, never a secret

    def wait(self, why: str) -> None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._failing_since > self.give_up_after_s:
            raise ClientError(f"gave up after {self.give_up_after_s:g} s without the server: {why}")
        delay = self._jitter.uniform(0, min(self.max_s, self.initial_s * 2**self._attempt))
        self._attempt += 1
        log.info("server unavailable (%s); retrying in %.2f s", why, delay)
        time.sleep(delay)

    def reset(self) -> None:
        self._failing_since, self._attempt = None, 0


def join(stub: Stub, client_id: str, num_examples: int) -> pb.JoinReply:
    request = pb.JoinRequest(
        protocol_version=PROTOCOL_VERSION, client_id=client_id, num_examples=num_examples
    )
    return pb.JoinReply.FromString(stub.join(request.SerializeToString(), timeout=CALL_TIMEOUT_S))


def get_task(
    stub: Stub, session: bytes, numel: int
) -> tuple[pb.Task, torch.Tensor, torch.Tensor | None] | pb.Wait | pb.Done:
    """The next task with its global adapter and SCAFFOLD's server control (None without), or a Wait or
    Done."""
    replies = stub.get_task(pb.TaskRequest(session=session).SerializeToString(), timeout=CALL_TIMEOUT_S)
    first = pb.TaskReply.FromString(next(iter(replies)))
    kind = first.WhichOneof("kind")
    if kind == "wait":
        return first.wait
    if kind == "done":
        return first.done
    if kind != "task":
        raise ClientError(f"the server sent {kind} where a task was expected")
    task = first.task
    if task.adapter_numel != numel:
        raise ClientError(f"the server's adapter has {task.adapter_numel} values, this client's {numel}")
    if task.control_numel not in (0, numel):
        raise ClientError(
            f"the server's control has {task.control_numel} values, this client's adapter {numel}"
        )
    total = numel + task.control_numel
    buffer = bytearray()
    for raw in replies:
        buffer += pb.TaskReply.FromString(raw).adapter_chunk
        if len(buffer) > total * 4:
            raise ClientError("the server sent more adapter bytes than the task declared")
    values = torch.from_numpy(float32_values(buffer, total, "the global adapter").copy())
    return task, values[:numel], values[numel:] if task.control_numel else None


def update_stream(header: pb.UpdateHeader, payload: bytes, chunk_bytes: int) -> Iterator[bytes]:
    yield pb.UpdateChunk(header=header).SerializeToString()
    for chunk in chunked(payload, chunk_bytes):
        yield pb.UpdateChunk(data=bytes(chunk)).SerializeToString()


class RoundCalls:
    """One task's calls: its round, nonce and session on every request."""

    def __init__(self, stub: Stub, session: bytes, task: pb.Task, chunk_bytes: int) -> None:
        self.stub, self.session, self.chunk_bytes = stub, session, chunk_bytes
        self.round_num, self.nonce = int(task.round), task.nonce
        self.left_out: str | None = None

    def send(self, reply: Submission | EvalReport) -> pb.SubmitReply:
        header, data = convert.reply_to_pb(
            reply, session=self.session, round_num=self.round_num, nonce=self.nonce
        )
        stream = update_stream(header, data, self.chunk_bytes)
        return pb.SubmitReply.FromString(self.stub.submit(stream, timeout=CALL_TIMEOUT_S))

    def call(self, **stage: object) -> pb.SecAggReply:
        request = pb.SecAggRequest(session=self.session, round=self.round_num, nonce=self.nonce, **stage)
        return pb.SecAggReply.FromString(
            self.stub.secagg(request.SerializeToString(), timeout=CALL_TIMEOUT_S)
        )

    def poll(self, stage: Stage) -> pb.SecAggReply | None:
        """The server's message that opens `stage`, or None (with `left_out` set) when told Done."""
        while True:
            reply = self.call(poll=pb.Poll(stage=int(stage)))
            kind = reply.WhichOneof("kind")
            if kind == "done":
                self.left_out = reply.done.reason
                return None
            if kind != "wait":
                return reply
            time.sleep(reply.wait.retry_after_ms / 1000)

    def secure(self, participant: Responder, request: SecureTrainRequest) -> str:
        """The four SecAgg+ stages; what happened, for the site's log."""
        rnd, slot = self.round_num, request.member.slot
        self.call(advertise=sw.advertise_to_pb(participant.respond(request)))  # type: ignore[arg-type]
        reply = self.poll(Stage.SHARE_KEYS)
        if reply is None:
            return f"left out: {self.left_out}"
        keys = sw.neighbour_keys_from_pb(reply.neighbour_keys, rnd, slot)
        self.call(share=sw.share_keys_to_pb(participant.respond(keys)))  # type: ignore[arg-type]
        reply = self.poll(Stage.MASKED_INPUT)
        if reply is None:
            return f"left out: {self.left_out}"
        forwarded = sw.forwarded_from_pb(reply.forwarded, rnd, slot)
        submission = participant.respond(forwarded)
        assert isinstance(submission, Submission)
        answer = self.send(submission)
        if not answer.accepted:
            return answer.detail
        reply = self.poll(Stage.UNMASK)
        if reply is None:
            return f"masked input sent; {self.left_out}"
        request_unmask = sw.unmask_request_from_pb(reply.unmask_request, rnd, slot)
        self.call(unmask=sw.unmask_to_pb(participant.respond(request_unmask)))  # type: ignore[arg-type]
        return "accepted"


def take_part(
    stub: Stub,
    client_id: str,
    build: Callable[[str], SiteRun],
    *,
    give_up_after_s: float = 600.0,
    notify: Callable[[str], None] = lambda _msg: None,
    show: Callable[[str], None] = lambda _state: None,
    diagnose: Callable[[], TlsProblem | None] = lambda: None,
) -> ClientResult:
    """Take part in the server's run until it is done. `build(config_toml)` makes the site's participant
    from the run's config, once, after the first join. `notify` gets what happened (a line each), `show`
    what the site is doing now (connecting, waiting, training round r, uploading, evaluating). When the
    server is unavailable, `diagnose()` says whether TLS is why (a problem retrying cannot fix: it ends
    the site at once) or returns None (an outage: retried with backoff)."""
    backoff = Backoff(give_up_after_s=give_up_after_s)
    site: SiteRun | None = None
    session: bytes | None = None
    trained: set[int] = set()  # rounds trained in (a round handed out again after a restart counts once)
    while True:
        try:
            if session is None:
                show("connecting")
                reply = join(stub, client_id, 0 if site is None else site.train_examples)
                session = reply.session
                backoff.reset()
                if site is None:
                    show("loading the model and this site's data")
                    site = build(reply.config_toml)
                    notify(f"{client_id}: joined; {site.train_examples} training examples")
                continue
            assert site is not None
            found = get_task(stub, session, site.adapter_numel)
            backoff.reset()
            if isinstance(found, pb.Done):
                show("done")
                return ClientResult(len(trained), found.reason)
            if isinstance(found, pb.Wait):
                show("waiting for the next round")
                time.sleep(found.retry_after_ms / 1000)
                continue
            task, global_flat, control = found
            request = convert.request_from_pb(task, global_flat, client_id, control)
            calls = RoundCalls(stub, session, task, site.chunk_bytes)
            what = "evaluating" if task.kind else "training"
            show(f"round {task.round}: {what}")
            if isinstance(request, SecureTrainRequest):
                outcome = calls.secure(site.participant, request)
                trained.add(calls.round_num)
            else:
                answer = site.participant.respond(request)
                assert isinstance(answer, Submission | EvalReport)
                show(f"round {task.round}: uploading")
                outcome = calls.send(answer).detail
                if isinstance(answer, Submission):
                    trained.add(calls.round_num)
            notify(f"{client_id}: round {task.round} ({'evaluate' if task.kind else 'train'}): {outcome}")
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED and session is not None:
                session = None  # the server restarted: join again
                continue
            if code == grpc.StatusCode.FAILED_PRECONDITION and session is not None:
                log.info("%s: %s", client_id, exc.details())  # a stale round: ask for the next task
                continue
            if code == grpc.StatusCode.UNAVAILABLE and (problem := diagnose()) is not None:
                raise ClientError(str(problem)) from None
            if code in RETRYABLE:
                show("the server is not reachable; retrying")
                backoff.wait(f"{code.name}: {exc.details()}")
                continue
            raise ClientError(f"the server refused {client_id}: {code.name}: {_reason(exc)}") from None


def _reason(exc: grpc.RpcError) -> str:
    """The server's refusal, without gRPC's trailing `: OK` of a handshake error."""
    details = exc.details() or ""
    return details.removesuffix(": OK")
