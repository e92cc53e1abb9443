"""The gRPC handlers: parse a peer's bytes, ask the coordinator, answer; every refusal is typed and counted.

Handlers are registered generically with no deserializer, so each request reaches us as raw bytes and is
parsed by `wire.parse`: malformed protobuf is answered INVALID_ARGUMENT and counted like any other refused
message, and the server carries on. An update is read chunk by chunk into a buffer of the size its header
declared (checked against the round's limits first); a float32 update must have exactly the adapter's
size and be finite; a payload is decoded by `fedtune.compress` in the round engine (never unpickled).
Protobuf stops here: the coordinator gets plain values (`convert`, `secagg_wire`), and answers with plain
values or a `Refusal`, which goes back with its status from `status`. Unexpected failures are logged and
answered INTERNAL without taking the server down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import torch

from fedtune.errors import Refusal
from fedtune.round.transport import Purpose
from fedtune.secagg import Stage
from fedtune.transport import convert
from fedtune.transport import fedtune_v2_pb2 as pb
from fedtune.transport import secagg_wire as sw
from fedtune.transport.coordinator import Coordinator, Done, Offer, Wait
from fedtune.transport.status import code_of
from fedtune.transport.tls import peer_identity
from fedtune.transport.wire import (
    PROTOCOL_VERSION,
    SERVICE,
    UpdateLimits,
    check_declared_size,
    chunked,
    float32_bytes,
    parse,
    read_data,
    read_header,
)

log = logging.getLogger("fedtune.server")


class FederationService:
    """Join, GetTask, SubmitUpdate and SecAgg over a `Coordinator`. `insecure`: identities come from the
    messages."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        adapter_numel: int,
        max_update_bytes: int,
        chunk_bytes: int,
        insecure: bool = False,
        max_concurrent_uploads: int = 4,
    ) -> None:
        """At most `max_concurrent_uploads` update buffers exist at once (others wait, their bytes held
        back by HTTP/2 flow control), and as many adapter downloads are in flight, so the server's memory
        does not grow with the clients."""
        self.coordinator = coordinator
        self.adapter_numel = adapter_numel
        self.max_update_bytes = max_update_bytes
        self._upload_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self._download_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self.chunk_bytes = chunk_bytes
        self.insecure = insecure
        self._adapter_cache: tuple[tuple[torch.Tensor, ...], bytes] | None = None
        self._cache_lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Join": grpc.unary_unary_rpc_method_handler(self._guard(self.join)),
                "GetTask": grpc.unary_stream_rpc_method_handler(self._guard_stream(self.get_task)),
                "SubmitUpdate": grpc.stream_unary_rpc_method_handler(self._guard(self.submit)),
                "SecAgg": grpc.unary_unary_rpc_method_handler(self._guard(self.secagg)),
            },
        )

    # ---- error handling --------------------------------------------------------------------------------

    def _refuse(self, context: grpc.ServicerContext, refusal: Refusal) -> None:
        client = peer_identity(context)
        log.warning("refused %s from %s: %s", refusal.kind, client or context.peer(), refusal.detail)
        self.coordinator.refuse(refusal, client)
        context.abort(code_of(refusal.kind), f"{refusal.kind}: {refusal.detail}")

    def _internal(self, context: grpc.ServicerContext, exc: Exception) -> None:
        log.exception("unexpected failure serving %s", context.peer())
        self.coordinator.refuse(Refusal("internal", f"{type(exc).__name__}: {exc}"), peer_identity(context))
        context.abort(grpc.StatusCode.INTERNAL, "internal error; the server carries on")

    @contextmanager
    def _answering(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Turn a refusal into its typed status and anything unexpected into INTERNAL; the server goes on."""
        try:
            yield
        except Refusal as refusal:
            self._refuse(context, refusal)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                raise  # context.abort's own exception: the status is already set
            self._internal(context, exc)

    def _guard(self, method: Callable[[Any, grpc.ServicerContext], bytes]) -> Callable[..., bytes]:
        def guarded(request: Any, context: grpc.ServicerContext) -> bytes:
            with self._answering(context):
                return method(request, context)
            raise AssertionError("unreachable: context.abort raises")

        return guarded

    def _guard_stream(
        self, method: Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]
    ) -> Callable[..., Iterator[bytes]]:
        def guarded(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            with self._answering(context):
                yield from method(request, context)

        return guarded

    def _identity(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The caller's verified identity; a message claiming another one is refused."""
        verified = peer_identity(context)
        if verified is None:
            if not self.insecure:
                raise Refusal("unauthenticated", "no client certificate")
            return claimed
        if claimed and claimed != verified:
            raise Refusal(
                "wrong_identity", f"the message claims client {claimed!r} but the certificate is {verified!r}"
            )
        return verified

    def _adapter_bytes(self, values: tuple[torch.Tensor, ...]) -> bytes:
        """The task's float32 bytes (the adapter, and SCAFFOLD's control after it), made once per adapter
        whatever the number of downloads."""
        with self._cache_lock:
            cached = self._adapter_cache
            if (
                cached is None
                or len(cached[0]) != len(values)
                or any(a is not b for a, b in zip(cached[0], values, strict=True))
            ):
                cached = self._adapter_cache = (values, b"".join(float32_bytes(t.numpy()) for t in values))
            return cached[1]

    def _limits(self) -> UpdateLimits:
        """What the open round accepts: evaluation reports, masked inputs, or plain updates."""
        found = self.coordinator.purpose()
        purpose, words = found if found is not None else (Purpose.TRAIN, 0)
        return UpdateLimits(
            self.adapter_numel,
            self.max_update_bytes,
            masked_words=words,
            evaluating=purpose == Purpose.EVALUATE,
        )

    # ---- the four calls --------------------------------------------------------------------------------

    def join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = parse(pb.JoinRequest, request)
        if req.protocol_version != PROTOCOL_VERSION:
            raise Refusal(
                "wrong_version",
                f"protocol version {req.protocol_version}; this server speaks {PROTOCOL_VERSION}: "
                "install the same fedtune version on both ends",
            )
        client_id = self._identity(context, req.client_id)
        token = self.coordinator.join(client_id, int(req.num_examples))
        log.info("client %s joined", client_id)
        reply = pb.JoinReply(
            protocol_version=PROTOCOL_VERSION, session=token, config_toml=self.coordinator.config_toml
        )
        return reply.SerializeToString()

    def get_task(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = parse(pb.TaskRequest, request)
        session = self.coordinator.session(req.session)
        self._identity(context, session.client_id)
        found = self.coordinator.next_task(session)
        if isinstance(found, Done):
            yield pb.TaskReply(done=pb.Done(reason=found.reason)).SerializeToString()
            return
        if found is None:
            wait = pb.Wait(retry_after_ms=self.coordinator.retry_after_ms, reason="no task for you now")
            yield pb.TaskReply(wait=wait).SerializeToString()
            return
        offer: Offer = found
        header = convert.task_to_pb(offer.message, offer.nonce, offer.deadline - self.coordinator.clock())
        values = convert.task_values(offer.message)
        with self._download_slots:  # the adapter's chunks queued for sending, a few clients at a time
            yield pb.TaskReply(task=header).SerializeToString()
            for chunk in chunked(self._adapter_bytes(values), self.chunk_bytes):
                yield pb.TaskReply(adapter_chunk=bytes(chunk)).SerializeToString()

    def submit(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        header = read_header(next(request_iterator, None))
        session = self.coordinator.session(header.session)
        self._identity(context, session.client_id)
        self.coordinator.check_submission(session, int(header.round), header.nonce)  # before reading data
        total = check_declared_size(header, self._limits())
        with self._upload_slots:
            data = read_data(request_iterator, total)
            reply = convert.reply_from_pb(header, data, session.client_id, self.adapter_numel)
            ok = self.coordinator.submit(session, int(header.round), header.nonce, reply)
        detail = "accepted" if ok else "the round already has its updates: counted as a straggler"
        return pb.SubmitReply(accepted=ok, detail=detail).SerializeToString()

    def secagg(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = parse(pb.SecAggRequest, request)
        session = self.coordinator.session(req.session)
        self._identity(context, session.client_id)
        round_num, nonce = int(req.round), req.nonce
        kind = req.WhichOneof("stage")
        if kind == "poll":
            stage = int(req.poll.stage)
            if stage not in (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK):
                raise Refusal("malformed", f"a poll waits for stage 1, 2 or 3, not {stage}")
            answer = self.coordinator.poll(session, round_num, nonce, Stage(stage))
            if isinstance(answer, Done):
                return pb.SecAggReply(done=pb.Done(reason=answer.reason)).SerializeToString()
            if isinstance(answer, Wait):
                wait = pb.Wait(retry_after_ms=answer.retry_after_ms, reason=answer.reason)
                return pb.SecAggReply(wait=wait).SerializeToString()
            return sw.to_reply(answer).SerializeToString()
        slot = self.coordinator.slot_of(session, round_num, nonce)
        if kind == "advertise":
            message: object = sw.advertise_from_pb(req.advertise, round_num, slot)
        elif kind == "share":
            message = sw.share_keys_from_pb(req.share, round_num, slot)
        elif kind == "unmask":
            message = sw.unmask_from_pb(req.unmask, round_num, slot)
        else:
            raise Refusal("malformed", f"a SecAgg request must carry a stage message or a poll, not {kind}")
        self.coordinator.secagg(session, round_num, nonce, message)
        return pb.SecAggReply(ack=pb.Ack()).SerializeToString()
