"""fedtune.transport.wire: parsing, chunking, float32 values and update limits, with known answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from fedtune.errors import Refusal
from fedtune.transport import fedtune_v2_pb2 as pb
from fedtune.transport.status import code_of
from fedtune.transport.wire import (
    FLOAT32_BYTES,
    PAYLOAD_OVERHEAD_BYTES,
    UpdateLimits,
    check_declared_size,
    chunked,
    float32_bytes,
    float32_values,
    parse,
    read_data,
    read_header,
)

GARBAGE = b"\x0a\x7f\x00"  # field 1, length 127, one byte present: no message type parses it


def header(encoding: int, total_bytes: int) -> pb.UpdateHeader:
    return pb.UpdateHeader(encoding=encoding, total_bytes=total_bytes)


def data(raw: bytes) -> bytes:
    return pb.UpdateChunk(data=raw).SerializeToString()


@contextmanager
def refused(kind: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> Iterator[Any]:
    """The block must raise a Refusal of `kind` that the service answers with `code`."""
    with pytest.raises(Refusal) as info:
        yield info
    assert info.value.kind == kind, info.value
    assert code_of(info.value.kind) == code
    assert str(info.value).startswith(f"{kind}: ")


# ---- parse ---------------------------------------------------------------------------------------------


def test_parse_round_trips_a_message():
    sent = pb.JoinRequest(protocol_version=1, client_id="site-a", num_examples=24)
    got = parse(pb.JoinRequest, sent.SerializeToString())
    assert (got.protocol_version, got.client_id, got.num_examples) == (1, "site-a", 24)


def test_parse_of_no_bytes_is_the_default_message():
    assert parse(pb.TaskRequest, b"").session == b""


@pytest.mark.parametrize("message_type", [pb.JoinRequest, pb.TaskRequest, pb.UpdateChunk])
@pytest.mark.parametrize("raw", [GARBAGE, b"\xff", b"\x08", b"\x12\x05ab"])
def test_parse_refuses_malformed_bytes(message_type, raw):
    with refused("malformed") as info:
        parse(message_type, raw)
    assert message_type.__name__ in info.value.detail


def test_parse_refuses_invalid_utf8_in_a_string_field():
    raw = b"\x12\x02\xff\xfe"  # JoinRequest.client_id = two bytes that are not UTF-8
    with refused("malformed"):
        parse(pb.JoinRequest, raw)


def test_parse_refuses_what_is_not_bytes():
    with refused("malformed"):
        parse(pb.JoinRequest, "not bytes")  # type: ignore[arg-type]


# ---- chunked -------------------------------------------------------------------------------------------


def test_chunked_cuts_into_views_of_at_most_chunk_bytes():
    source = b"abcdefg"
    chunks = list(chunked(source, 3))
    assert [bytes(c) for c in chunks] == [b"abc", b"def", b"g"]
    assert all(isinstance(c, memoryview) and c.obj is source for c in chunks)  # views, not copies


def test_chunked_of_exact_multiples_and_of_nothing():
    assert [bytes(c) for c in chunked(b"abcdef", 3)] == [b"abc", b"def"]
    assert [bytes(c) for c in chunked(b"ab", 10)] == [b"ab"]
    assert list(chunked(b"", 3)) == []


def test_chunked_counts_bytes_of_a_float32_array():
    values = np.arange(5, dtype="<f4")  # 20 bytes
    chunks = list(chunked(values, 8))
    assert [len(c) for c in chunks] == [8, 8, 4]
    assert b"".join(bytes(c) for c in chunks) == values.tobytes()


# ---- float32 -------------------------------------------------------------------------------------------


def test_float32_bytes_are_little_endian():
    assert float32_bytes(np.array([1.0, -2.0])) == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert float32_bytes(np.array([1.0], dtype=">f4")) == b"\x00\x00\x80\x3f"


def test_float32_values_reads_exactly_numel_values():
    got = float32_values(b"\x00\x00\x80\x3f\x00\x00\x00\xc0", 2, "x")
    np.testing.assert_array_equal(got, np.array([1.0, -2.0], dtype=np.float32))
    assert got.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(float32_values(bytearray(12), 3, "x"), np.zeros(3, np.float32))


@pytest.mark.parametrize("size", [0, 7, 9, 12])
def test_float32_values_refuses_another_size(size):
    with refused("wrong_shape") as info:
        float32_values(bytes(size), 2, "the update")
    assert f"has {size} bytes, expected 2 float32 values" in info.value.detail


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float32_values_refuses_non_finite(bad):
    raw = float32_bytes(np.array([0.0, bad, 1.0]))
    with refused("non_finite"):
        float32_values(raw, 3, "the update")


# ---- limits --------------------------------------------------------------------------------------------


def test_allowed_bytes_by_encoding():
    limits = UpdateLimits(adapter_numel=10, max_update_bytes=1000)
    assert limits.allowed_bytes(pb.ENCODING_FLOAT32) == 40
    assert limits.allowed_bytes(pb.ENCODING_PAYLOAD) == 1000  # the configured cap binds
    assert limits.allowed_bytes(pb.ENCODING_REFUSED) == 0
    assert limits.allowed_bytes(pb.ENCODING_UNSPECIFIED) == 0
    roomy = UpdateLimits(adapter_numel=10, max_update_bytes=10**9)
    assert roomy.allowed_bytes(pb.ENCODING_PAYLOAD) == 2 * 10 * FLOAT32_BYTES + PAYLOAD_OVERHEAD_BYTES


LIMITS = UpdateLimits(adapter_numel=10, max_update_bytes=1000)


@pytest.mark.parametrize(
    ("encoding", "total", "expected"),
    [
        (pb.ENCODING_FLOAT32, 40, 40),
        (pb.ENCODING_PAYLOAD, 1, 1),
        (pb.ENCODING_PAYLOAD, 1000, 1000),
        (pb.ENCODING_REFUSED, 0, 0),
    ],
)
def test_check_declared_size_accepts(encoding, total, expected):
    assert check_declared_size(header(encoding, total), LIMITS) == expected


@pytest.mark.parametrize(
    ("encoding", "total", "kind", "code"),
    [
        (pb.ENCODING_FLOAT32, 36, "wrong_shape", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ENCODING_FLOAT32, 44, "wrong_shape", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ENCODING_FLOAT32, 2**63, "wrong_shape", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ENCODING_PAYLOAD, 1001, "oversize", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.ENCODING_PAYLOAD, 2**64 - 1, "oversize", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.ENCODING_PAYLOAD, 0, "malformed", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ENCODING_REFUSED, 4, "oversize", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (pb.ENCODING_UNSPECIFIED, 40, "malformed", grpc.StatusCode.INVALID_ARGUMENT),
        (7, 40, "malformed", grpc.StatusCode.INVALID_ARGUMENT),  # an enum value this version does not know
    ],
)
def test_check_declared_size_refuses(encoding, total, kind, code):
    with refused(kind, code):
        check_declared_size(header(encoding, total), LIMITS)


def test_an_evaluation_round_takes_evaluation_reports_only_and_others_none():
    evaluating = UpdateLimits(adapter_numel=10, max_update_bytes=1000, evaluating=True)
    assert check_declared_size(header(pb.ENCODING_EVALUATION, 0), evaluating) == 0
    with refused("wrong_shape"):
        check_declared_size(header(pb.ENCODING_EVALUATION, 8), evaluating)  # a report has no data
    for encoding in (pb.ENCODING_FLOAT32, pb.ENCODING_PAYLOAD, pb.ENCODING_REFUSED, pb.ENCODING_MASKED):
        with refused("wrong_encoding"):
            check_declared_size(header(encoding, 40), evaluating)
    with refused("wrong_encoding"):
        check_declared_size(header(pb.ENCODING_EVALUATION, 0), LIMITS)
    secure = UpdateLimits(adapter_numel=10, max_update_bytes=1000, masked_words=12)
    assert check_declared_size(header(pb.ENCODING_MASKED, 48), secure) == 48
    with refused("wrong_encoding"):
        check_declared_size(header(pb.ENCODING_EVALUATION, 0), secure)


# ---- the update stream ---------------------------------------------------------------------------------


def test_read_header_returns_the_first_message_header():
    first = pb.UpdateChunk(header=pb.UpdateHeader(round=3, nonce=b"n", total_bytes=8)).SerializeToString()
    got = read_header(first)
    assert (got.round, got.nonce, got.total_bytes) == (3, b"n", 8)


@pytest.mark.parametrize(
    "first", [None, data(b"abcd"), b"", GARBAGE], ids=["none", "data", "empty", "garbage"]
)
def test_read_header_refuses_a_stream_without_a_header_first(first):
    with refused("malformed"):
        read_header(first)


def test_read_data_joins_chunks_of_the_declared_size():
    got = read_data(iter([data(b"ab"), data(b""), data(b"cde")]), 5)
    assert isinstance(got, bytearray)
    assert got == bytearray(b"abcde")
    assert read_data(iter([]), 0) == bytearray()


def test_read_data_refuses_more_than_declared_at_the_chunk_that_overflows():
    sent = []

    def chunks():
        for raw in (b"abc", b"de", b"never read"):
            sent.append(raw)
            yield data(raw)

    with refused("oversize", grpc.StatusCode.RESOURCE_EXHAUSTED) as info:
        read_data(chunks(), 4)
    assert sent == [b"abc", b"de"]  # refused at the second chunk, before reading on
    assert "4 bytes" in info.value.detail


@pytest.mark.parametrize("chunks", [[], [b"ab"], [b"a", b"bc"]])
def test_read_data_refuses_fewer_than_declared(chunks):
    with refused("truncated") as info:
        read_data(iter([data(c) for c in chunks]), 4)
    assert f"after {sum(map(len, chunks))} of 4" in info.value.detail


@pytest.mark.parametrize(
    "bad",
    [pb.UpdateChunk(header=pb.UpdateHeader(round=1)).SerializeToString(), b"", GARBAGE],
    ids=["header", "empty-message", "garbage"],
)
def test_read_data_refuses_anything_but_data_chunks(bad):
    with refused("malformed"):
        read_data(iter([data(b"ab"), bad]), 4)
