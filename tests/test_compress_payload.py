"""The wire format: round trips, zstd only where it pays, and malformed input raising only PayloadError."""

import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.compress import CompressionSpec, PayloadError, compress, decode, entropy, parse, to_bytes
from fedtune.compress.payload import HEADER, Method, Payload
from fedtune.errors import FedtuneError

SEED = bytes(range(32))
D = 600

SPECS = {
    "none": CompressionSpec("none"),
    "quantize-8": CompressionSpec("quantize", bits=8, block_size=64),
    "quantize-4-tensor": CompressionSpec("quantize", bits=4, block_size=None),
    "quantize-3": CompressionSpec("quantize", bits=3, block_size=7),
    "topk-f32": CompressionSpec("topk", bits=32, fraction=0.1),
    "topk-f16": CompressionSpec("topk", bits=16, fraction=0.1),
    "topk-8": CompressionSpec("topk", bits=8, fraction=0.1, block_size=16),
    "randomk-f32": CompressionSpec("randomk", bits=32, fraction=0.1),
    "randomk-4": CompressionSpec("randomk", bits=4, fraction=0.1),
    "randomk-rescaled": CompressionSpec("randomk", bits=32, fraction=0.1, rescale=True, error_feedback=False),
}


def delta(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 1e-3


def payload_of(name: str, d: int = D) -> Payload:
    return compress(delta(d=d), SPECS[name], generator=torch.Generator().manual_seed(1), shared_seed=SEED)


def test_payload_error_is_a_fedtune_error():
    assert issubclass(PayloadError, FedtuneError)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("entropy_coding", [False, True])
def test_payloads_round_trip(name, entropy_coding):
    p = payload_of(name)
    data = to_bytes(p, entropy_coding=entropy_coding)
    back = parse(data, D)
    assert (back.method, back.numel, back.count, back.value_format) == (p.method, D, p.count, p.value_format)
    assert torch.equal(decode(data, D, seed=SEED), p.to_dense())
    assert to_bytes(back, entropy_coding=entropy_coding) == data


def test_rescaled_randomk_is_unbiased():
    x = delta(3, 50)
    spec = SPECS["randomk-rescaled"]
    reps = 2000
    total = torch.zeros(50)
    for s in range(reps):
        total += compress(x, spec, generator=torch.Generator(), shared_seed=s.to_bytes(32, "big")).to_dense()
    # each coordinate is (d/k) x_i with probability k/d: variance x_i^2 (d/k - 1) = 9 x_i^2
    assert ((total / reps - x).abs() <= 6 * x.abs() * (9 / reps) ** 0.5).all()


def test_float16_values_fall_back_to_float32_out_of_range():
    x = torch.tensor([1e5, 1.0, 0.0, 0.0])
    p = compress(x, CompressionSpec("topk", bits=16, fraction=0.5), generator=torch.Generator())
    assert p.values.dtype == np.float32 and torch.equal(decode(to_bytes(p), 4), torch.tensor([1e5, 1, 0, 0]))


def test_zstd_is_used_only_where_it_pays():
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert entropy.pack(noise) == bytes([entropy.RAW]) + noise
    packed = entropy.pack(bytes(4096))
    assert packed[0] == entropy.ZSTD and len(packed) < 100
    assert entropy.unpack(packed, 4096) == bytes(4096)
    assert entropy.pack(bytes(4096), enabled=False) == bytes([entropy.RAW]) + bytes(4096)
    for name in SPECS:
        p = payload_of(name, d=20_000)
        assert len(to_bytes(p, entropy_coding=True)) <= len(to_bytes(p, entropy_coding=False))
    topk = payload_of("topk-f32", d=20_000)  # index gaps compress; float32 values barely do
    assert len(to_bytes(topk)) < 0.9 * len(to_bytes(topk, entropy_coding=False))


def test_zstd_sections_that_lie_or_overflow_are_refused():
    frame = zstandard.ZstdCompressor().compress(bytes(70_000))
    zstd = bytes([entropy.ZSTD])
    with pytest.raises(PayloadError, match="declares 70000"):
        entropy.unpack(zstd + frame, 1000)  # an oversize claim, refused before decompressing
    lying = bytearray(frame)
    lying[5:9] = struct.pack("<I", 66_000)  # the frame content size field (single segment, 4 bytes)
    with pytest.raises(PayloadError, match="decompress"):
        entropy.unpack(zstd + bytes(lying), 66_000)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100))
    with pytest.raises(PayloadError, match="declares"):
        entropy.unpack(zstd + unsized, 100)
    with pytest.raises(PayloadError, match="trailing"):
        entropy.unpack(zstd + frame + b"x", 70_000)
    with pytest.raises(PayloadError):
        entropy.unpack(zstd + frame[:-4], 70_000)
    with pytest.raises(PayloadError, match="flag"):
        entropy.unpack(b"\x07abc", 3)
    with pytest.raises(PayloadError, match="empty"):
        entropy.unpack(b"", 0)


@pytest.mark.parametrize("name", ["quantize-3", "topk-8", "randomk-f32"])
def test_every_truncation_and_extension_is_refused(name):
    data = to_bytes(payload_of(name, d=60))
    for end in range(len(data)):
        with pytest.raises(PayloadError):
            parse(data[:end], 60)
    with pytest.raises(PayloadError):
        parse(data + b"\x00", 60)


def _patched(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# header offsets: magic 0, version 4, method 5, format 6, bits 7, flags 8, width 9, reserved 10,
# numel 12, count 16, block 20, index/scale/value lengths 24/28/32, seed 36
@pytest.mark.parametrize(
    ("name", "fmt", "offset", "value", "match"),
    [
        ("none", "<I", 12, D + 1, "update of 601"),  # a larger update than expected
        ("topk-f32", "<I", 16, D + 1, "claims 601"),  # more values than the update has
        ("none", "<I", 16, D - 1, "claims 599"),  # a dense update of fewer values
        ("none", "<B", 5, 9, "unknown method"),
        ("none", "<B", 6, 9, "unknown method"),
        ("none", "<B", 4, 2, "version-1"),
        ("none", "<B", 0, 0, "magic"),
        ("quantize-8", "<B", 7, 9, "bits"),
        ("none", "<B", 7, 8, "bits"),
        ("topk-f32", "<B", 9, 3, "index width"),
        ("none", "<B", 8, 1, "flags"),
        ("none", "<H", 10, 1, "unknown"),
        ("none", "<B", 40, 1, "seed"),
        ("none", "<I", 32, 2**32 - 1, "header counts"),
        ("topk-f32", "<I", 24, 0, "header counts"),
    ],
)
def test_inconsistent_headers_are_refused(name, fmt, offset, value, match):
    data = _patched(to_bytes(payload_of(name), entropy_coding=False), fmt, offset, value)
    with pytest.raises(PayloadError, match=match):
        decode(data, D)


def test_a_block_size_beyond_the_vector_decodes_as_one_block_without_allocating_it():
    """A payload may claim any block size; one as long as the vector or longer is one block. The decoder
    once padded the codes to the claimed block size: a client's 2^31 made the server allocate 10 GB."""
    q = compress(
        torch.linspace(-1, 1, 40),
        CompressionSpec("quantize", bits=8, block_size=64),
        generator=torch.Generator(),
    )
    honest = decode(to_bytes(q, entropy_coding=False), 40)
    claimed = _patched(to_bytes(q, entropy_coding=False), "<I", 20, 2**31)  # the header's block size
    assert torch.equal(decode(claimed, 40), honest)


def test_non_finite_values_and_bad_scales_are_refused():
    values = np.array([1.0, np.nan, 0.0], np.float32)
    with pytest.raises(PayloadError, match="non-finite"):
        parse(to_bytes(Payload(Method.DENSE, 3, values)), 3)
    q = compress(delta(), SPECS["quantize-8"], generator=torch.Generator())
    scale_start = HEADER + 1  # the raw scale section: flag byte, then float32 (lo, step) per block
    raw = to_bytes(q, entropy_coding=False)
    for value in (float("inf"), -1.0, 3e38):
        bad = bytearray(raw)
        struct.pack_into("<f", bad, scale_start + 4, value)  # the first block's step
        with pytest.raises(PayloadError, match="scales"):
            parse(bytes(bad), D)


def test_rescaled_values_that_would_overflow_float32_are_refused():
    """Found by the fuzz test below: a finite value near float32's maximum, times random-k's d/k, is inf."""
    p = payload_of("randomk-rescaled")
    big = p.values.copy()
    big[0] = np.float32(1e38)  # finite, but x (D / k) = x 10 is not
    with pytest.raises(PayloadError, match="overflow"):
        decode(to_bytes(Payload(p.method, D, big, None, p.seed, p.rescale)), D)
    big[0] = np.float32(1e36)  # x 10 still fits: decoded as sent
    assert torch.isfinite(decode(to_bytes(Payload(p.method, D, big, None, p.seed, p.rescale)), D)).all()


def test_randomk_from_another_seed_is_refused():
    data = to_bytes(payload_of("randomk-f32"))
    with pytest.raises(PayloadError, match="seed"):
        decode(data, D, seed=bytes(32))


def test_topk_indices_out_of_range_are_refused():
    p = Payload(Method.TOPK, D, np.ones(2, np.float32), torch.tensor([5, D + 10]))
    with pytest.raises(PayloadError, match="indices"):
        parse(to_bytes(p), D)


VALID = [to_bytes(payload_of(name, d=40)) for name in SPECS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_payload_error(data):
    with pytest.raises(PayloadError):
        decode(data, 40)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-8, 8),
)
def test_mutated_payloads_decode_or_raise_payload_error(data, flips, resize):
    out = bytearray(data)
    for position, byte in flips:
        out[position % len(out)] = byte
    out = out[: len(out) + resize] if resize < 0 else out + bytes(resize)
    try:
        decoded = decode(bytes(out), 40)
    except PayloadError:
        return
    assert decoded.shape == (40,) and decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


HEADER_FIELDS = st.tuples(
    st.integers(0, 2),  # method
    st.integers(0, 2),  # value format
    st.integers(0, 9),  # bits
    st.integers(0, 1),  # flags
    st.sampled_from([0, 1, 2, 4, 3]),  # index width
    st.one_of(st.just(40), st.integers(0, 45)),  # count
    st.integers(0, 45),  # block size
)


@settings(max_examples=400, deadline=None)
@given(HEADER_FIELDS, st.binary(max_size=300), st.integers(0, 300), st.integers(0, 300), st.booleans())
def test_random_headers_over_random_sections_raise_only_payload_error(fields, body, cut_a, cut_b, zero_seed):
    """Plausible header fields (right magic and size) over random sections reach the deeper checks."""
    method, fmt, bits, flags, width, count, block = fields
    a, b = sorted((min(cut_a, len(body)), min(cut_b, len(body))))
    lengths = (a, b - a, len(body) - b)
    seed = bytes(32) if zero_seed else SEED
    fixed = (b"FTCU", 1, method, fmt, bits, flags, width, 0, 40, count, block)
    header = struct.pack("<4sBBBBBBHIIIIII32s", *fixed, *lengths, seed)
    try:
        decoded = decode(header + body, 40)
    except PayloadError:
        return
    assert decoded.shape == (40,) and torch.isfinite(decoded).all()
