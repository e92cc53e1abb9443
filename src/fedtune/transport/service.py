"""The gRPC handlers: parse a peer's bytes, ask the coordinator, answer; every refusal is typed and counted.

Handlers are registered generically with no deserializer, so each request reaches us as raw bytes and is
parsed by `wire.parse`: malformed protobuf is answered INVALID_ARGUMENT and counted like any other refused
message, and the server carries on. An update is read chunk by chunk into a buffer of the size its header
declared (checked against the round's limits first); a float32 update must have exactly the adapter's
size and be finite; a payload is decoded by `fedtune.compress` (never unpickled). Unexpected failures are
logged and answered INTERNAL without taking the server down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import grpc

from fedtune.deploy.coordinator import ClientReport, Coordinator, Session
from fedtune.transport import fedtune_v1_pb2 as pb
from fedtune.transport.tls import peer_identity
from fedtune.transport.wire import (
    PROTOCOL_VERSION,
    SERVICE,
    UpdateLimits,
    WireError,
    check_declared_size,
    chunked,
    float32_values,
    parse,
    read_data,
    read_header,
)

log = logging.getLogger("fedtune.server")


class FederationService:
    """Join, GetTask, SubmitUpdate over a `Coordinator`. `insecure`: identities come from the messages."""

    def __init__(
        self,
        coordinator: Coordinator,
        limits: Callable[[], UpdateLimits],
        *,
        chunk_bytes: int,
        insecure: bool = False,
        weight_of: Callable[[int], int] = lambda n: n,
        max_concurrent_uploads: int = 4,
    ) -> None:
        """`limits` gives the open round's update limits; `weight_of` maps a client's declared number of
        examples to its aggregation weight (capped, or 1 under DP). At most `max_concurrent_uploads`
        update buffers exist at once (others wait, their bytes held back by HTTP/2 flow control), and as
        many adapter downloads are in flight, so the server's memory does not grow with the clients."""
        self.coordinator = coordinator
        self._upload_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self._download_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self.limits = limits
        self.chunk_bytes = chunk_bytes
        self.insecure = insecure
        self.weight_of = weight_of

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

    def _refuse(self, context: grpc.ServicerContext, error: WireError) -> None:
        client = peer_identity(context)
        log.warning("refused %s from %s: %s", error.kind, client or context.peer(), error.detail)
        self.coordinator.refuse(error, client)
        context.abort(error.code, f"{error.kind}: {error.detail}")

    def _internal(self, context: grpc.ServicerContext, exc: Exception) -> None:
        log.exception("unexpected failure serving %s", context.peer())
        self.coordinator.refuse(WireError("internal", f"{type(exc).__name__}: {exc}"), peer_identity(context))
        context.abort(grpc.StatusCode.INTERNAL, "internal error; the server carries on")

    @contextmanager
    def _answering(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Turn a refusal into its typed status and anything unexpected into INTERNAL; the server goes on."""
        try:
            yield
        except WireError as error:
            self._refuse(context, error)
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
                raise WireError("unauthenticated", "no client certificate", grpc.StatusCode.UNAUTHENTICATED)
            return claimed
        if claimed and claimed != verified:
            raise WireError(
                "wrong_identity",
                f"the message claims client {claimed!r} but the certificate is {verified!r}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        return verified

    # ---- the three calls -------------------------------------------------------------------------------

    def join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = parse(pb.JoinRequest, request)
        if req.protocol_version != PROTOCOL_VERSION:
            raise WireError(
                "wrong_version",
                f"protocol version {req.protocol_version}; this server speaks {PROTOCOL_VERSION}: "
                "install the same fedtune version on both ends",
                grpc.StatusCode.FAILED_PRECONDITION,
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
        if isinstance(found, str):
            yield pb.TaskReply(done=pb.Done(reason=found)).SerializeToString()
            return
        if found is None:
            wait = pb.Wait(retry_after_ms=self.coordinator.retry_after_ms, reason="no task for you now")
            yield pb.TaskReply(wait=wait).SerializeToString()
            return
        task, assignment = found
        header = pb.Task(
            round=task.round_num,
            nonce=assignment.nonce,
            client_index=assignment.index,
            adapter_numel=task.adapter_numel,
            clip_l2_norm=task.clip_l2_norm,
            shared_seed=task.shared_seed,
            deadline_s=max(0.0, task.deadline - self.coordinator.clock()),
        )
        if task.secure is not None:
            from fedtune.deploy.secure import setup_message

            header.secagg.CopyFrom(setup_message(task.secure.params, assignment.slot))
        with self._download_slots:  # the adapter's chunks queued for sending, a few clients at a time
            yield pb.TaskReply(task=header).SerializeToString()
            for chunk in chunked(task.adapter_bytes, self.chunk_bytes):
                yield pb.TaskReply(adapter_chunk=bytes(chunk)).SerializeToString()

    def submit(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        header = read_header(next(request_iterator, None))
        session = self.coordinator.session(header.session)
        self._identity(context, session.client_id)
        self.coordinator.check_submission(session, int(header.round), header.nonce)  # before reading data
        limits = self.limits()
        total = check_declared_size(header, limits)
        with self._upload_slots:
            return self._receive(session, header, limits, total, request_iterator)

    def _receive(
        self,
        session: Session,
        header: pb.UpdateHeader,
        limits: UpdateLimits,
        total: int,
        request_iterator: Iterator[bytes],
    ) -> bytes:
        data = read_data(request_iterator, total)
        report = ClientReport(
            client_id=session.client_id,
            num_examples=int(header.num_examples),
            num_steps=int(header.num_steps),
            train_loss=float(header.train_loss),
            eval_loss=float(header.eval_loss) if header.eval_examples else None,
            eval_examples=int(header.eval_examples),
            fits_clip=bool(header.fits_clip),
            error=header.error or None,
        )
        update: Any
        if header.encoding == pb.ENCODING_REFUSED:
            update = None
            if not report.error:
                report = replace(report, error="refused by the client")
        elif header.encoding == pb.ENCODING_MASKED:
            update = data  # uint32 words, checked and unmasked by the secure round
        elif header.encoding == pb.ENCODING_FLOAT32:
            import torch

            update = torch.from_numpy(float32_values(data, limits.adapter_numel, "the update"))  # no copy
        else:
            update = bytes(data)
        if header.num_examples < 1 and update is not None:
            raise WireError("malformed", "an update must come from at least one training example")
        ok = self.coordinator.accept(
            session,
            int(header.round),
            header.nonce,
            update,
            report,
            wire_bytes=total,
            weight=self.weight_of(int(header.num_examples)),
        )
        detail = "accepted" if ok else "the round already has its updates: counted as a straggler"
        return pb.SubmitReply(accepted=ok, detail=detail).SerializeToString()

    def secagg(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = parse(pb.SecAggRequest, request)
        session = self.coordinator.session(req.session)
        self._identity(context, session.client_id)
        return self.coordinator.secagg(session, req).SerializeToString()
