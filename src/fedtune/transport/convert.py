"""The round engine's messages to and from protobuf: pure conversions, both ends, every bound checked.

The server turns a member's task into a `Task` header (the adapter, and SCAFFOLD's server control when the
run has one, follow in chunks: `task_values`) and a client's
`UpdateHeader` with its data into a `Submission` or an `EvalReport`; a site does the reverse. Values are
little-endian float32 or uint32 (`numpy.frombuffer`), payloads stay bytes for `fedtune.compress` to decode;
nothing is unpickled. SecAgg+ stage messages are `secagg_wire`'s.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from fedtune.errors import Refusal
from fedtune.round.messages import (
    ClientReport,
    CompressedUpdate,
    DenseUpdate,
    EvalReport,
    EvalRequest,
    MaskedUpdate,
    SecureTrainRequest,
    Submission,
    TrainRequest,
    TrainTask,
)
from fedtune.round.plan import Member
from fedtune.transport import fedtune_v2_pb2 as pb
from fedtune.transport import secagg_wire as sw
from fedtune.transport.wire import float32_values

Request = TrainRequest | SecureTrainRequest | EvalRequest


# ---- server -> client ---------------------------------------------------------------------------------


def task_to_pb(message: Request, nonce: bytes, deadline_s: float) -> pb.Task:
    """A member's task as the header of a GetTask reply (the adapter's chunks follow it)."""
    if isinstance(message, EvalRequest):
        return pb.Task(
            round=message.round_num,
            nonce=nonce,
            client_index=message.member.index,
            adapter_numel=message.global_flat.numel(),
            deadline_s=max(0.0, deadline_s),
            kind=pb.TASK_EVALUATE,
            personalize=message.personalize,
        )
    task = message.task
    header = pb.Task(
        round=task.round_num,
        nonce=nonce,
        client_index=message.member.index,
        adapter_numel=task.global_flat.numel(),
        clip_l2_norm=task.clip_l2_norm or 0.0,
        shared_seed=task.shared_seed or b"",
        deadline_s=max(0.0, deadline_s),
        kind=pb.TASK_TRAIN,
        control_numel=0 if task.control is None else task.control.numel(),
    )
    if isinstance(message, SecureTrainRequest):
        header.secagg.CopyFrom(sw.setup_to_pb(message.params, message.member.slot, message.noise_variance))
    return header


def task_values(message: Request) -> tuple[torch.Tensor, ...]:
    """The float32 tensors that follow a task's header, in order: the adapter, then the control if any."""
    if isinstance(message, EvalRequest) or message.task.control is None:
        return (message.global_flat,)
    return (message.global_flat, message.task.control)


def request_from_pb(
    task: pb.Task, global_flat: torch.Tensor, client_id: str, control: torch.Tensor | None = None
) -> Request:
    """A site's view of its task: the request its participant answers (`control`: SCAFFOLD's c)."""
    round_num = int(task.round)
    secure = task.HasField("secagg")
    member = Member(int(task.secagg.slot) if secure else 0, int(task.client_index), client_id)
    if task.kind == pb.TASK_EVALUATE:
        return EvalRequest(round_num, global_flat, member, bool(task.personalize))
    train = TrainTask(
        round_num,
        global_flat,
        clip_l2_norm=float(task.clip_l2_norm) if task.clip_l2_norm > 0 else None,
        shared_seed=bytes(task.shared_seed) or None,
        control=control,
    )
    if secure:
        params = sw.params_from_pb(task.secagg, round_num)
        return SecureTrainRequest(train, member, params, float(task.secagg.noise_variance))
    return TrainRequest(train, member)


# ---- client -> server ---------------------------------------------------------------------------------


def reply_to_pb(
    reply: Submission | EvalReport, *, session: bytes, round_num: int, nonce: bytes
) -> tuple[pb.UpdateHeader, bytes]:
    """A submission or evaluation report as an update header and the data that follows it."""
    header = pb.UpdateHeader(session=session, round=round_num, nonce=nonce)
    if isinstance(reply, EvalReport):
        header.encoding = pb.ENCODING_EVALUATION
        header.eval_nll, header.eval_tokens = reply.nll, reply.tokens
        if reply.personal_nll is not None:
            header.personal_nll = reply.personal_nll
        return header, b""
    report = reply.report
    header.num_examples = report.num_examples
    header.num_steps = report.num_steps
    header.train_loss = report.train_loss if math.isfinite(report.train_loss) else 0.0
    header.fits_clip = report.fits_clip
    if report.dpsgd_epsilon is not None:
        header.dpsgd_epsilon = report.dpsgd_epsilon
    update = reply.update
    if update is None:
        header.encoding, header.error = pb.ENCODING_REFUSED, report.error or "refused"
        return header, b""
    if isinstance(update, MaskedUpdate):
        header.encoding = pb.ENCODING_MASKED
        data = np.ascontiguousarray(update.words, dtype="<u4").tobytes()
    elif isinstance(update, DenseUpdate):
        header.encoding = pb.ENCODING_FLOAT32
        data = np.ascontiguousarray(update.values.numpy(), dtype="<f4").tobytes()
    else:
        header.encoding, data = pb.ENCODING_PAYLOAD, update.payload
    header.total_bytes = len(data)
    return header, data


def reply_from_pb(
    header: pb.UpdateHeader, data: bytearray, client_id: str, adapter_numel: int
) -> Submission | EvalReport:
    """What a client sent, from its header and data (already checked against the round's limits)."""
    if header.encoding == pb.ENCODING_EVALUATION:
        nll, tokens = float(header.eval_nll), int(header.eval_tokens)
        personal = float(header.personal_nll) if header.HasField("personal_nll") else None
        for loss in (nll, personal):
            if loss is not None and not (math.isfinite(loss) and loss >= 0):
                raise Refusal(
                    "malformed", f"an evaluation report's loss must be finite and non-negative, got {loss}"
                )
        return EvalReport(client_id, nll, tokens, personal)
    report = ClientReport(
        client_id=client_id,
        num_examples=int(header.num_examples),
        num_steps=int(header.num_steps),
        train_loss=float(header.train_loss),
        fits_clip=bool(header.fits_clip),
        error=header.error or None,
        dpsgd_epsilon=float(header.dpsgd_epsilon) if header.HasField("dpsgd_epsilon") else None,
    )
    if header.encoding == pb.ENCODING_REFUSED:
        if report.error is None:
            report = replace(report, error="refused by the client")
        return Submission(report, None)
    if header.num_examples < 1:
        raise Refusal("malformed", "an update must come from at least one training example")
    if header.encoding == pb.ENCODING_MASKED:
        return Submission(report, MaskedUpdate(np.frombuffer(data, dtype="<u4").astype(np.uint32)))
    if header.encoding == pb.ENCODING_FLOAT32:
        values = float32_values(data, adapter_numel, "the update")
        return Submission(report, DenseUpdate(torch.from_numpy(values)))  # no copy
    return Submission(report, CompressedUpdate(bytes(data)))
