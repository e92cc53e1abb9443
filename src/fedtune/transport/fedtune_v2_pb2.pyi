from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TRAIN: _ClassVar[TaskKind]
    TASK_EVALUATE: _ClassVar[TaskKind]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FLOAT32: _ClassVar[Encoding]
    ENCODING_PAYLOAD: _ClassVar[Encoding]
    ENCODING_REFUSED: _ClassVar[Encoding]
    ENCODING_MASKED: _ClassVar[Encoding]
    ENCODING_EVALUATION: _ClassVar[Encoding]
TASK_TRAIN: TaskKind
TASK_EVALUATE: TaskKind
ENCODING_UNSPECIFIED: Encoding
ENCODING_FLOAT32: Encoding
ENCODING_PAYLOAD: Encoding
ENCODING_REFUSED: Encoding
ENCODING_MASKED: Encoding
ENCODING_EVALUATION: Encoding

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "client_id", "num_examples")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    num_examples: int
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., num_examples: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("protocol_version", "session", "config_toml")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session: bytes
    config_toml: str
    def __init__(self, protocol_version: _Optional[int] = ..., session: _Optional[bytes] = ..., config_toml: _Optional[str] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    def __init__(self, session: _Optional[bytes] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("round", "nonce", "client_index", "adapter_numel", "clip_l2_norm", "shared_seed", "deadline_s", "secagg", "kind", "control_numel", "personalize")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NUMEL_FIELD_NUMBER: _ClassVar[int]
    CLIP_L2_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARED_SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTROL_NUMEL_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZE_FIELD_NUMBER: _ClassVar[int]
    round: int
    nonce: bytes
    client_index: int
    adapter_numel: int
    clip_l2_norm: float
    shared_seed: bytes
    deadline_s: float
    secagg: SecAggSetup
    kind: TaskKind
    control_numel: int
    personalize: bool
    def __init__(self, round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., client_index: _Optional[int] = ..., adapter_numel: _Optional[int] = ..., clip_l2_norm: _Optional[float] = ..., shared_seed: _Optional[bytes] = ..., deadline_s: _Optional[float] = ..., secagg: _Optional[_Union[SecAggSetup, _Mapping]] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., control_numel: _Optional[int] = ..., personalize: _Optional[bool] = ...) -> None: ...

class SecAggSetup(_message.Message):
    __slots__ = ("slot", "cohort", "threshold", "neighbours", "bits", "clip_range", "max_weight", "vector_size", "noise_variance")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SIZE_FIELD_NUMBER: _ClassVar[int]
    NOISE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    slot: int
    cohort: int
    threshold: int
    neighbours: int
    bits: int
    clip_range: float
    max_weight: int
    vector_size: int
    noise_variance: float
    def __init__(self, slot: _Optional[int] = ..., cohort: _Optional[int] = ..., threshold: _Optional[int] = ..., neighbours: _Optional[int] = ..., bits: _Optional[int] = ..., clip_range: _Optional[float] = ..., max_weight: _Optional[int] = ..., vector_size: _Optional[int] = ..., noise_variance: _Optional[float] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class TaskReply(_message.Message):
    __slots__ = ("task", "adapter_chunk", "wait", "done")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    task: Task
    adapter_chunk: bytes
    wait: Wait
    done: Done
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., adapter_chunk: _Optional[bytes] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("session", "round", "nonce", "encoding", "total_bytes", "num_examples", "num_steps", "train_loss", "error", "fits_clip", "eval_nll", "eval_tokens", "dpsgd_epsilon", "personal_nll")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FITS_CLIP_FIELD_NUMBER: _ClassVar[int]
    EVAL_NLL_FIELD_NUMBER: _ClassVar[int]
    EVAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DPSGD_EPSILON_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_NLL_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    round: int
    nonce: bytes
    encoding: Encoding
    total_bytes: int
    num_examples: int
    num_steps: int
    train_loss: float
    error: str
    fits_clip: bool
    eval_nll: float
    eval_tokens: int
    dpsgd_epsilon: float
    personal_nll: float
    def __init__(self, session: _Optional[bytes] = ..., round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., total_bytes: _Optional[int] = ..., num_examples: _Optional[int] = ..., num_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., error: _Optional[str] = ..., fits_clip: _Optional[bool] = ..., eval_nll: _Optional[float] = ..., eval_tokens: _Optional[int] = ..., dpsgd_epsilon: _Optional[float] = ..., personal_nll: _Optional[float] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("client", "enc_key", "mask_key")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ENC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    client: int
    enc_key: bytes
    mask_key: bytes
    def __init__(self, client: _Optional[int] = ..., enc_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("sender", "receiver", "sealed")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    sender: int
    receiver: int
    sealed: bytes
    def __init__(self, sender: _Optional[int] = ..., receiver: _Optional[int] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class OwnerShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeys(_message.Message):
    __slots__ = ("enc_key", "mask_key")
    ENC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    enc_key: bytes
    mask_key: bytes
    def __init__(self, enc_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ...) -> None: ...

class ShareKeys(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class Unmask(_message.Message):
    __slots__ = ("seed_shares", "key_shares")
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    seed_shares: _containers.RepeatedCompositeFieldContainer[OwnerShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[OwnerShare]
    def __init__(self, seed_shares: _Optional[_Iterable[_Union[OwnerShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[OwnerShare, _Mapping]]] = ...) -> None: ...

class Poll(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: int
    def __init__(self, stage: _Optional[int] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("session", "round", "nonce", "advertise", "share", "unmask", "poll")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    POLL_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    round: int
    nonce: bytes
    advertise: AdvertiseKeys
    share: ShareKeys
    unmask: Unmask
    poll: Poll
    def __init__(self, session: _Optional[bytes] = ..., round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., advertise: _Optional[_Union[AdvertiseKeys, _Mapping]] = ..., share: _Optional[_Union[ShareKeys, _Mapping]] = ..., unmask: _Optional[_Union[Unmask, _Mapping]] = ..., poll: _Optional[_Union[Poll, _Mapping]] = ...) -> None: ...

class NeighbourKeys(_message.Message):
    __slots__ = ("neighbours",)
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    def __init__(self, neighbours: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ...) -> None: ...

class ForwardedShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("ack", "wait", "neighbour_keys", "forwarded", "unmask_request", "done")
    ACK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOUR_KEYS_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    wait: Wait
    neighbour_keys: NeighbourKeys
    forwarded: ForwardedShares
    unmask_request: UnmaskRequest
    done: Done
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., neighbour_keys: _Optional[_Union[NeighbourKeys, _Mapping]] = ..., forwarded: _Optional[_Union[ForwardedShares, _Mapping]] = ..., unmask_request: _Optional[_Union[UnmaskRequest, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...
