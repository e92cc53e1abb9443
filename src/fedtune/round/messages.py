"""What crosses a transport between the round engine and a participant: plain frozen dataclasses.

Server to client: a `TrainRequest` (the round's `TrainTask`: the global adapter, SCAFFOLD's server control
when it is on, and how to encode; and the client's `Member` entry), a `SecureTrainRequest` (the same,
opening a SecAgg+ round, whose later messages are the protocol's own dataclasses in `secagg.messages`), an
`EvalRequest`. Client to server: a
`Submission` (a `ClientReport` and the update as it travels: dense float32, compressed payload bytes,
masked words, or nothing when the client refused its own update), an `EvalReport`, or a SecAgg+ message.
Every message knows its size in bytes (`nbytes`), which is what the round's `bytes_up` and `bytes_down`
count, whatever the transport. The in-process transport passes these objects as they are; the gRPC one
converts them at its edge (`transport.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtune.round.plan import Member
from fedtune.secagg import SecAggParams

FLOAT32_BYTES = 4


@dataclass(frozen=True, eq=False)
class TrainTask:
    """What every selected client of a round receives."""

    round_num: int
    global_flat: torch.Tensor  # float32, the adapter to start from
    clip_l2_norm: float | None  # client-level DP: clip the update to this L2 norm; None: no clipping
    shared_seed: bytes | None  # random-k: the round's coordinate seed
    control: torch.Tensor | None = None  # SCAFFOLD: the server's control variate c (float32, adapter size)

    def nbytes(self) -> int:
        control = 0 if self.control is None else self.control.numel()
        return (self.global_flat.numel() + control) * FLOAT32_BYTES


@dataclass(frozen=True, eq=False)
class TrainRequest:
    task: TrainTask
    member: Member
    values: int | None = None  # a client of a lower rank: the values of its components, all it needs

    @property
    def global_flat(self) -> torch.Tensor:
        return self.task.global_flat

    def nbytes(self) -> int:
        return self.task.nbytes() if self.values is None else self.values * FLOAT32_BYTES


@dataclass(frozen=True, eq=False)
class SecureTrainRequest:
    """The task of a secure round and its public SecAgg+ parameters; the client answers with its keys,
    and trains when the masked-input stage opens (`secagg.messages.ForwardedShares`)."""

    task: TrainTask
    member: Member  # member.slot is the client's id in the protocol
    params: SecAggParams
    noise_variance: float = 0.0  # distributed DP: per-value variance of the client's Skellam share

    @property
    def global_flat(self) -> torch.Tensor:
        return self.task.global_flat

    def nbytes(self) -> int:
        return self.task.nbytes()


@dataclass(frozen=True, eq=False)
class EvalRequest:
    round_num: int
    global_flat: torch.Tensor
    member: Member
    personalize: bool = False  # the run's last evaluation: also make and evaluate the personal adapter

    def nbytes(self) -> int:
        return self.global_flat.numel() * FLOAT32_BYTES


@dataclass(frozen=True)
class ClientReport:
    """What a client says about its local work (diagnostics; only the update is aggregated)."""

    client_id: str
    num_examples: int  # training examples: the weight rule's input
    num_steps: int
    train_loss: float  # mean over the steps taken (NaN when none finished)
    fits_clip: bool = True  # client-level DP: the update was within the clip norm (adaptive clipping)
    error: str | None = None  # why the client refused its own update
    dpsgd_epsilon: float | None = None  # DP-SGD: the per-record epsilon it has spent on its data so far


@dataclass(frozen=True, eq=False)
class DenseUpdate:
    """An update as float32 values, one per adapter value (two under SCAFFOLD: delta, then control)."""

    values: torch.Tensor

    def nbytes(self) -> int:
        return self.values.numel() * FLOAT32_BYTES


@dataclass(frozen=True, eq=False)
class CompressedUpdate:
    """An update as `fedtune.compress` payload bytes."""

    payload: bytes

    def nbytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True, eq=False)
class MaskedUpdate:
    """Secure aggregation's masked input: uint32 words that only sum to something."""

    words: np.ndarray

    def nbytes(self) -> int:
        return int(self.words.shape[0]) * 4


Update = DenseUpdate | CompressedUpdate | MaskedUpdate


@dataclass(frozen=True, eq=False)
class Submission:
    report: ClientReport
    update: Update | None  # None: the client refused its own update (report.error says why)

    def nbytes(self) -> int:
        return 0 if self.update is None else self.update.nbytes()


@dataclass(frozen=True)
class EvalReport:
    """A client's evaluation of the adapter it was sent: its summed next-token loss over `tokens`."""

    client_id: str
    nll: float
    tokens: int
    personal_nll: float | None = None  # with `personalize`: the personal adapter's, on the same tokens

    def nbytes(self) -> int:
        return 16 if self.personal_nll is None else 24
