"""Unbiased stochastic quantization of a float32 vector to 1..8 bits, one scale per block or per tensor.

Each block of `block_size` values (or the whole vector, `block_size=None`) is mapped from [min, max] onto
the levels 0..L, L = 2^bits - 1, and rounded up with probability equal to its fractional part, so
E[dequantize(q)] = x and every decoded value is within one step, (max - min) / L, of its input. The
rounding noise is drawn from a `torch.Generator` the caller passes; nothing uses a global RNG.

Min/max (asymmetric) rather than absmax: it uses all 2^bits levels on the block's actual range, and a
block of equal values decodes exactly. Codes are sent relative to each block's code for 0.0, mod 2^bits
(a bijection, undone on decode): zero then has the same code in every block, so the code histogram is the
same from block to block and zstd's Huffman stage can use it. On a heavy-tailed LoRA-like delta that cuts
the zstd'd codes by 10% (8 bits, blocks of 256) to 20% (4 bits, blocks of 1024); with absolute codes zstd
gained nothing at 8 bits.

Scales are float32 (lo, step) pairs, 8 bytes per block: 3% of the codes at 8 bits with blocks of 256, 6%
at 4 bits. float16 would halve that but cannot hold a block's minimum finely enough when |min| is large
against the block's range, nor steps below 6e-8, which small late-round LoRA deltas reach at 8 bits.
Codes are packed little-endian at `bits` bits each: one byte per code at 8 bits, two per byte at 4 (low
nibble first), a bit-level pack for other widths. All of it is vectorized; no Python loop runs over
values or blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_BITS = 8


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized vector: packed codes and one (lo, step) pair per block; decodes to lo + code * step."""

    codes: np.ndarray  # uint8, packed: ceil(numel * bits / 8) bytes
    lo: np.ndarray  # float32, one per block
    step: np.ndarray  # float32, one per block, >= 0
    bits: int
    block_size: int | None  # None: one block for the whole vector
    numel: int

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.numel, self.block_size)


def num_blocks(numel: int, block_size: int | None) -> int:
    """How many scale pairs a vector of `numel` values carries."""
    if numel == 0:
        return 0
    return 1 if block_size is None else -(-numel // block_size)


def packed_nbytes(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"quantization bits must be 1 to {MAX_BITS}, got {bits}")


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """x as [blocks, size], the last block padded with x's last value (min and max do not move)."""
    pad = -x.shape[0] % size
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    return x.view(-1, size)


def zero_codes(lo: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    """Per block, the code nearest to 0.0 (uint8): codes are sent relative to it, mod 2^bits."""
    levels = 2**bits - 1
    safe = np.where(step > 0, step, np.float32(1))
    return np.clip(np.rint(-lo / safe), 0, levels).astype(np.uint8)


def quantize(x: torch.Tensor, bits: int, block_size: int | None, generator: torch.Generator) -> Quantized:
    """Stochastically round the 1-d float vector `x` to `bits` bits with one scale per block."""
    _check_bits(bits)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-d vector, got shape {tuple(x.shape)}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be positive or None, got {block_size}")
    x = x.detach().to(torch.float32)
    numel = x.shape[0]
    if numel == 0:
        empty = np.empty(0, np.float32)
        return Quantized(np.empty(0, np.uint8), empty, empty, bits, block_size, 0)
    if not torch.isfinite(x).all():
        raise ValueError("the vector has non-finite values; refuse the update before compressing it")
    levels = 2**bits - 1
    size = numel if block_size is None else block_size
    xb = _blocks(x, size)
    lo = xb.amin(dim=1)
    step = (xb.amax(dim=1) - lo) / levels
    y = (xb - lo[:, None]) / torch.where(step > 0, step, 1.0)[:, None]  # in [0, L]; 0 for a flat block
    y += torch.rand(y.shape, generator=generator)  # floor(y + u) rounds up with probability frac(y)
    codes = y.floor_().clamp_(0, levels).to(torch.uint8)
    lo_np, step_np = lo.numpy(), step.numpy()
    zero = torch.from_numpy(zero_codes(lo_np, step_np, bits))
    codes = ((codes - zero[:, None]) & levels).view(-1)[:numel]  # uint8 wraps: mod 2^bits
    return Quantized(pack_codes(codes.numpy(), bits), lo_np, step_np, bits, block_size, numel)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 vector lo + code * step, per block (the same arithmetic on client and server)."""
    if q.numel == 0:
        return torch.empty(0)
    codes = torch.from_numpy(unpack_codes(q.codes, q.bits, q.numel))
    # a block as long as the vector or longer is one block: never pad to a length the payload only claims
    size = q.numel if q.block_size is None else min(q.block_size, q.numel)
    pad = -q.numel % size
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    zero = torch.from_numpy(zero_codes(q.lo, q.step, q.bits))
    codes = ((codes.view(-1, size) + zero[:, None]) & (2**q.bits - 1)).to(torch.float32)
    lo, step = torch.from_numpy(q.lo), torch.from_numpy(q.step)
    return torch.addcmul(lo[:, None], codes, step[:, None]).view(-1)[: q.numel]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8, each < 2^bits) packed at `bits` bits each, little-endian: ceil(n * bits / 8) bytes."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    if bits == 4:
        if codes.shape[0] % 2:
            codes = np.append(codes, np.uint8(0))
        return codes[0::2] | (codes[1::2] << 4)
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [n, bits], least significant first
    return np.packbits(planes.ravel(), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """The inverse of `pack_codes`: `numel` uint8 codes (the caller checks the packed length)."""
    _check_bits(bits)
    if packed.shape[0] != packed_nbytes(numel, bits):
        raise ValueError(f"{numel} codes of {bits} bits take {packed_nbytes(numel, bits)} bytes")
    if bits == 8:
        return packed
    if bits == 4:
        out = np.empty(2 * packed.shape[0], np.uint8)
        out[0::2] = packed & 0x0F
        out[1::2] = packed >> 4
        return out[:numel]
    planes = np.unpackbits(packed, count=numel * bits, bitorder="little").reshape(numel, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
