"""Framing and limits of fedtune's gRPC messages, with one typed error for everything a peer gets wrong.

Requests arrive as raw bytes and are parsed here, never by gRPC's own deserializer, so malformed protobuf
becomes a `Refusal` the service answers and counts, not a crash or an INTERNAL status. An update is a
header followed by data chunks; its declared size is checked against the round's limit before anything is
allocated, and every chunk against what remains. Nothing on this path unpickles: values are little-endian
float32 (`numpy.frombuffer`) or `fedtune.compress` payload bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from fedtune.errors import Refusal
from fedtune.transport import fedtune_v2_pb2 as pb

PROTOCOL_VERSION = 2
SERVICE = "fedtune.v2.Federation"
FLOAT32_BYTES = 4
PAYLOAD_OVERHEAD_BYTES = 1 << 16  # a compressed payload may exceed its values by its headers

M = TypeVar("M", bound=Message)


def parse(message_type: type[M], data: bytes) -> M:
    """A protobuf message from a peer's bytes; malformed bytes are a `Refusal`, never an exception
    from deep inside the library."""
    if not isinstance(data, bytes):
        raise Refusal("malformed", f"expected bytes for {message_type.__name__}")
    message = message_type()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise Refusal("malformed", f"{message_type.__name__} does not parse: {exc}") from None
    return message


def chunked(data: bytes | memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    """`data` cut into views of at most `chunk_bytes` (no copies)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]


def float32_bytes(values: np.ndarray) -> bytes:
    """Little-endian float32 bytes of a 1-D array (what travels for adapters and plain deltas)."""
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def float32_values(data: bytes | bytearray | memoryview, numel: int, what: str) -> np.ndarray:
    """The float32 values of `data`, which must hold exactly `numel` of them, all finite."""
    if len(data) != numel * FLOAT32_BYTES:
        raise Refusal("wrong_shape", f"{what} has {len(data)} bytes, expected {numel} float32 values")
    values = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(values).all():
        raise Refusal("non_finite", f"{what} holds NaN or Inf values")
    return values


@dataclass(frozen=True)
class UpdateLimits:
    """What the server accepts in the open round: the adapter size, the most bytes an update may declare,
    and which encodings: a secure round takes masked inputs of `masked_words` uint32 words only, an
    evaluation round evaluation reports only."""

    adapter_numel: int
    max_update_bytes: int
    masked_words: int = 0
    evaluating: bool = False

    def allowed_bytes(self, encoding: int) -> int:
        """The exact (float32, masked, evaluation) or largest (payload) data size for `encoding`."""
        if self.evaluating != (encoding == pb.ENCODING_EVALUATION):
            raise Refusal(
                "wrong_encoding",
                "this round evaluates the adapter: send an evaluation report"
                if self.evaluating
                else "an evaluation report outside an evaluation round",
            )
        secure = self.masked_words > 0
        if (
            not self.evaluating
            and secure != (encoding == pb.ENCODING_MASKED)
            and encoding != pb.ENCODING_REFUSED
        ):
            raise Refusal(
                "wrong_encoding",
                "this round runs through secure aggregation: send a masked input"
                if secure
                else "a masked input outside a secure aggregation round",
            )
        if encoding == pb.ENCODING_MASKED:
            return self.masked_words * 4
        if encoding == pb.ENCODING_FLOAT32:
            return self.adapter_numel * FLOAT32_BYTES
        if encoding == pb.ENCODING_PAYLOAD:
            return min(self.max_update_bytes, 2 * self.adapter_numel * FLOAT32_BYTES + PAYLOAD_OVERHEAD_BYTES)
        return 0


def read_header(first: bytes | None) -> pb.UpdateHeader:
    """The header that must open an update stream."""
    if first is None:
        raise Refusal("malformed", "empty update stream: the first message must be a header")
    chunk = parse(pb.UpdateChunk, first)
    if chunk.WhichOneof("kind") != "header":
        raise Refusal("malformed", "the first message of an update must be its header")
    return chunk.header


def check_declared_size(header: pb.UpdateHeader, limits: UpdateLimits) -> int:
    """The number of data bytes to expect, refused before any allocation when it breaks the limits."""
    known = (
        pb.ENCODING_FLOAT32,
        pb.ENCODING_PAYLOAD,
        pb.ENCODING_REFUSED,
        pb.ENCODING_MASKED,
        pb.ENCODING_EVALUATION,
    )
    if header.encoding not in known:
        raise Refusal("malformed", f"unknown update encoding {header.encoding}")
    allowed = limits.allowed_bytes(header.encoding)
    exact = (pb.ENCODING_FLOAT32, pb.ENCODING_MASKED, pb.ENCODING_EVALUATION)
    if header.encoding in exact and header.total_bytes != allowed:
        raise Refusal(
            "wrong_shape",
            f"a {pb.Encoding.Name(header.encoding)} update of this round has {allowed} bytes, "
            f"the header declares {header.total_bytes}",
        )
    if header.total_bytes > allowed:
        raise Refusal(
            "oversize",
            f"the update declares {header.total_bytes} bytes; the limit is {allowed}",
        )
    if header.encoding == pb.ENCODING_PAYLOAD and header.total_bytes == 0:
        raise Refusal("malformed", "a payload update declares no bytes")
    return int(header.total_bytes)


def read_data(rest: Iterable[bytes], total_bytes: int) -> bytearray:
    """The update's data chunks into one buffer of the declared size; more or fewer bytes are refused."""
    buffer = bytearray(total_bytes)
    filled = 0
    for raw in rest:
        chunk = parse(pb.UpdateChunk, raw)
        if chunk.WhichOneof("kind") != "data":
            raise Refusal("malformed", "only data chunks may follow an update's header")
        size = len(chunk.data)
        if filled + size > total_bytes:
            raise Refusal(
                "oversize",
                f"the update sends more than the {total_bytes} bytes its header declared",
            )
        buffer[filled : filled + size] = chunk.data
        filled += size
    if filled != total_bytes:
        raise Refusal("truncated", f"the update ended after {filled} of {total_bytes} declared bytes")
    return buffer
