"""The wire format of a compressed update: a fixed little-endian header, then up to three sections.

    header (68 bytes, `HEADER`): magic b"FTCU", version, method (dense, top-k, random-k), value format
        (float32, float16, quantized), bits, flags (bit 0: random-k rescaled by d/k), index width (top-k
        gap bytes), 2 reserved bytes, numel d, count k, block size (0: one scale for the tensor), the wire
        lengths of the index, scale and value sections, and the 32-byte random-k seed (zeros otherwise)
    indices: top-k only, gaps in byte planes (`sparsify.encode_indices`)
    scales:  quantized only, float32 (lo, step) per block
    values:  k float32, k float16, or the packed codes of k values

Each section is entropy-coded on its own (`entropy.pack`: a flag byte, zstd only where it is smaller), so
zstd sees one kind of data at a time (index bytes compress, float mantissas do not) and the decoder knows
the exact raw size of every section from the header before it decompresses anything. No pickle: parsing
is `struct` and `np.frombuffer`, and every field is checked against the others, the data's length and the
expected update size `numel`; anything wrong raises `PayloadError`. The length of `to_bytes` is what
the round's `bytes_up` counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from fedtune.compress import entropy
from fedtune.compress.errors import PayloadError
from fedtune.compress.quantize import MAX_BITS, Quantized, dequantize, num_blocks, packed_nbytes
from fedtune.compress.sparsify import INDEX_WIDTHS, decode_indices, densify, encode_indices, randomk_indices
from fedtune.secagg.prg import SEED_BYTES

MAGIC = b"FTCU"
VERSION = 1
_HEADER = struct.Struct(f"<4sBBBBBBHIIIIII{SEED_BYTES}s")
HEADER = _HEADER.size
NO_SEED = bytes(SEED_BYTES)
_RESCALED = 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_DECODABLE_MAX = _FLOAT32_MAX * (1 - 2**-20)  # a margin for float32 rounding of the rescale factor


class Method(IntEnum):
    DENSE = 0
    TOPK = 1
    RANDOMK = 2


class ValueFormat(IntEnum):
    FLOAT32 = 0
    FLOAT16 = 1
    QUANTIZED = 2


_METHODS = frozenset(int(m) for m in Method)
_FORMATS = frozenset(int(f) for f in ValueFormat)
_FLOAT_DTYPES = {ValueFormat.FLOAT32: np.dtype("<f4"), ValueFormat.FLOAT16: np.dtype("<f2")}


@dataclass(frozen=True, eq=False)
class Payload:
    """A compressed update in memory. `values` are float32/float16 (numpy) or `Quantized`."""

    method: Method
    numel: int
    values: np.ndarray | Quantized
    indices: torch.Tensor | None = None  # top-k: sorted int64
    seed: bytes = NO_SEED  # random-k: the round's shared seed
    rescale: bool = False  # random-k: the decoder multiplies by numel / count

    def __post_init__(self) -> None:
        if self.method == Method.TOPK and (self.indices is None or self.indices.shape != (self.count,)):
            raise ValueError("a top-k payload needs one index per value")
        if self.method == Method.DENSE and self.count != self.numel:
            raise ValueError(f"a dense payload has {self.numel} values, got {self.count}")
        if len(self.seed) != SEED_BYTES:
            raise ValueError(f"a random-k seed is {SEED_BYTES} bytes, got {len(self.seed)}")

    @property
    def count(self) -> int:
        return self.values.numel if isinstance(self.values, Quantized) else int(self.values.shape[0])

    @property
    def value_format(self) -> ValueFormat:
        if isinstance(self.values, Quantized):
            return ValueFormat.QUANTIZED
        return ValueFormat.FLOAT16 if self.values.dtype == np.float16 else ValueFormat.FLOAT32

    def kept_indices(self) -> torch.Tensor | None:
        """The coordinates the values belong to; None for a dense update."""
        if self.method == Method.TOPK:
            return self.indices
        if self.method == Method.RANDOMK:
            return randomk_indices(self.seed, self.numel, self.count)
        return None

    def decoded_values(self) -> torch.Tensor:
        """The k values as float32, as the server sees them (before any rescaling)."""
        if isinstance(self.values, Quantized):
            return dequantize(self.values)
        return torch.from_numpy(self.values.astype(np.float32))

    def to_dense(self) -> torch.Tensor:
        """The float32 update of `numel` values the server aggregates."""
        values = self.decoded_values()
        indices = self.kept_indices()
        if indices is None:
            return values
        scale = self.numel / self.count if self.rescale and self.count else 1.0
        return densify(indices, values, self.numel, scale)


def to_bytes(payload: Payload, *, entropy_coding: bool = True, level: int = entropy.DEFAULT_LEVEL) -> bytes:
    """Serialize; with `entropy_coding`, each section is zstd-compressed where that makes it smaller."""
    p = payload
    fmt = p.value_format
    index_raw, width = b"", 0
    if p.method == Method.TOPK and p.indices is not None:
        index_raw, width = encode_indices(p.indices)
    scale_raw, value_raw, bits, block = b"", b"", 0, 0
    if isinstance(p.values, Quantized):
        q = p.values
        scale_raw = np.stack([q.lo, q.step], axis=1).astype("<f4").tobytes()
        value_raw, bits, block = q.codes.tobytes(), q.bits, q.block_size or 0
    else:
        value_raw = p.values.astype(_FLOAT_DTYPES[fmt], copy=False).tobytes()
    sections = [
        entropy.pack(raw, enabled=entropy_coding, level=level) if raw else b""
        for raw in (index_raw, scale_raw, value_raw)
    ]
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        p.method,
        fmt,
        bits,
        _RESCALED if p.rescale else 0,
        width,
        0,
        p.numel,
        p.count,
        block,
        *(len(s) for s in sections),
        p.seed if p.method == Method.RANDOMK else NO_SEED,
    )
    return header + b"".join(sections)


def decode(data: bytes | memoryview, numel: int, *, seed: bytes | None = None) -> torch.Tensor:
    """The dense float32 update in `data`, which must be an update of `numel` values (and, for random-k,
    drawn from `seed` when given); PayloadError for anything malformed."""
    payload = parse(data, numel)
    if seed is not None and payload.method == Method.RANDOMK and payload.seed != seed:
        raise PayloadError("the random-k payload was drawn from another seed than this round's")
    return payload.to_dense()


def parse(data: bytes | memoryview, numel: int) -> Payload:
    """Read and check a payload of an update of `numel` values; PayloadError for anything malformed."""
    view = memoryview(data).cast("B")
    h = _read_header(view, numel)
    raw, start = [], HEADER
    for length, size in zip(h.lengths, h.raw_sizes, strict=True):
        section = view[start : start + length]
        start += length
        if size == 0 and length:
            raise PayloadError("the payload has a section its header says is empty")
        raw.append(entropy.unpack(section, size) if size else b"")
    index_raw, scale_raw, value_raw = raw

    indices = None
    if h.method == Method.TOPK:
        try:
            indices = decode_indices(index_raw, h.count, h.width, numel)
        except ValueError as exc:
            raise PayloadError(f"bad top-k indices: {exc}") from None
    rescale = numel / h.count if h.rescale and h.count else 1.0  # what `to_dense` multiplies by
    values: np.ndarray | Quantized
    if h.fmt == ValueFormat.QUANTIZED:
        scales = np.frombuffer(scale_raw, "<f4").reshape(-1, 2)
        lo, step = scales[:, 0].astype(np.float32), scales[:, 1].astype(np.float32)
        top = np.abs(lo.astype(np.float64)) + (2**h.bits - 1) * step.astype(np.float64)
        if not (np.isfinite(lo).all() and (step >= 0).all() and (top * rescale <= _DECODABLE_MAX).all()):
            raise PayloadError(
                "quantization scales must be finite with steps >= 0, and decode to finite values"
            )
        codes = np.frombuffer(value_raw, np.uint8).copy()
        values = Quantized(codes, lo, step, h.bits, h.block or None, h.count)
    else:
        values = np.frombuffer(value_raw, _FLOAT_DTYPES[h.fmt]).copy()
        if not np.isfinite(values).all():
            raise PayloadError("the payload has non-finite values")
        if values.size and float(np.abs(values).max()) * rescale > _DECODABLE_MAX:
            raise PayloadError("the payload's values overflow float32 once rescaled")
    return Payload(h.method, numel, values, indices, h.seed, h.rescale)


@dataclass(frozen=True)
class _Header:
    method: Method
    fmt: ValueFormat
    bits: int
    width: int
    count: int
    block: int
    rescale: bool
    lengths: tuple[int, int, int]  # on the wire: index, scale, value sections
    raw_sizes: tuple[int, int, int]  # after entropy decoding, derived from the fields above
    seed: bytes


def _read_header(view: memoryview, numel: int) -> _Header:
    """The header's fields, each checked against the others, the data's length and `numel`."""
    if len(view) < HEADER:
        raise PayloadError(f"a payload is at least {HEADER} bytes (its header), got {len(view)}")
    magic, version, method_id, fmt_id, bits, flags, width, reserved, claimed, count, block, *lengths, seed = (
        _HEADER.unpack_from(view)
    )
    if magic != MAGIC or version != VERSION:
        raise PayloadError(f"not a version-{VERSION} fedtune update payload (magic {bytes(magic)!r})")
    if method_id not in _METHODS or fmt_id not in _FORMATS or reserved:
        raise PayloadError(f"unknown method {method_id} or value format {fmt_id}")
    method, fmt = Method(method_id), ValueFormat(fmt_id)
    if claimed != numel:
        raise PayloadError(f"the payload is an update of {claimed} values, expected {numel}")
    if count > numel or (method == Method.DENSE and count != numel):
        raise PayloadError(f"the payload claims {count} values of an update of {numel}")
    quantized = fmt == ValueFormat.QUANTIZED
    if quantized != (1 <= bits <= MAX_BITS) or (not quantized and (bits or block)):
        raise PayloadError(f"bits = {bits} and block size = {block} do not fit value format {fmt.name}")
    if (method == Method.TOPK) != (width in INDEX_WIDTHS) or (method != Method.TOPK and width):
        raise PayloadError(f"index width {width} does not fit method {method.name}")
    if flags & ~_RESCALED or (flags and method != Method.RANDOMK):
        raise PayloadError(f"flags {flags:#x} do not fit method {method.name}")
    if method != Method.RANDOMK and seed != NO_SEED:
        raise PayloadError(f"a {method.name} payload carries no seed")
    if HEADER + sum(lengths) != len(view):
        raise PayloadError(f"the payload is {len(view)} bytes, its header counts {HEADER + sum(lengths)}")
    blocks = num_blocks(count, block or None) if quantized else 0
    value_bytes = packed_nbytes(count, bits) if quantized else count * _FLOAT_DTYPES[fmt].itemsize
    raw_sizes = (count * width if method == Method.TOPK else 0, 8 * blocks, value_bytes)
    return _Header(
        method, fmt, bits, width, count, block, bool(flags), tuple(lengths), raw_sizes, bytes(seed)
    )
