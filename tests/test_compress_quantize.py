"""Stochastic quantization: unbiased, within one step of its input, per block or per tensor; code packing."""

import math

import numpy as np
import pytest
import torch

from fedtune.compress.quantize import (
    Quantized,
    dequantize,
    num_blocks,
    pack_codes,
    packed_nbytes,
    quantize,
    unpack_codes,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_steps(q: Quantized) -> torch.Tensor:
    """Each value's quantization step (its block's)."""
    size = q.numel if q.block_size is None else q.block_size
    return torch.from_numpy(q.step).repeat_interleave(size)[: q.numel]


@pytest.mark.parametrize(("bits", "block_size"), [(8, 64), (4, 64), (3, 64), (1, 64), (4, None)])
def test_quantization_is_unbiased(bits, block_size):
    # R independent quantizations of one 64-value vector at once: tiled into blocks of 64 they share one scale
    x = torch.randn(64, generator=gen(1)) * 1e-3
    x[0], x[1] = x.min() - 1e-3, x.max() + 1e-3  # the extremes decode exactly; the rest are rounded
    reps = 4000
    tiled = x.repeat(reps)
    q = quantize(tiled, bits, 64 if block_size is not None else None, gen(2))
    decoded = dequantize(q).view(reps, 64)
    step = float(q.step[0])
    # each rounding is x's grid point below or above it, a Bernoulli of variance <= step^2 / 4
    bound = 6 * (step / 2) / math.sqrt(reps)
    assert (decoded.mean(dim=0) - x).abs().max() < bound
    assert decoded.std(dim=0).max() <= step / 2 * 1.01  # and no more spread than that


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("block_size", [1, 7, 256, None])
def test_every_value_decodes_within_one_step(bits, block_size):
    x = torch.randn(1001, generator=gen(bits)) * torch.logspace(-5, -1, 1001)  # scales differ along it
    q = quantize(x, bits, block_size, gen(3))
    decoded = dequantize(q)
    assert q.lo.dtype == q.step.dtype == np.float32 and len(q.lo) == num_blocks(1001, block_size)
    assert len(q.codes) == packed_nbytes(1001, bits)
    assert ((decoded - x).abs() <= block_steps(q) * (1 + 1e-5) + 1e-12).all()


def test_per_block_steps_are_never_coarser_than_the_tensor_step():
    x = torch.randn(4096, generator=gen(4)) * 1e-3
    x[100] = 0.5  # one outlier widens the per-tensor range, and only its own block's
    per_tensor = quantize(x, 4, None, gen(5))
    per_block = quantize(x, 4, 256, gen(5))
    assert (per_block.step <= per_tensor.step[0]).all()
    err_tensor = (dequantize(per_tensor) - x).abs()
    err_block = (dequantize(per_block) - x).abs()
    assert err_tensor.max() <= per_tensor.step[0] * (1 + 1e-5)
    assert err_block[256:].max() <= float(per_block.step[1:].max()) * (1 + 1e-5)
    assert err_block.norm() < err_tensor.norm() / 3


def test_flat_blocks_and_small_vectors_decode_exactly():
    x = torch.tensor([0.25] * 5 + [-1.0] * 5)
    assert torch.equal(dequantize(quantize(x, 4, 5, gen())), x)
    one = torch.tensor([3.5])
    assert torch.equal(dequantize(quantize(one, 8, None, gen())), one)
    empty = quantize(torch.empty(0), 8, 256, gen())
    assert empty.numel == 0 and dequantize(empty).shape == (0,)
    extremes = torch.tensor([-2.0, 1.0, 0.5])  # min and max are grid points of their block
    decoded = dequantize(quantize(extremes, 2, None, gen()))
    assert decoded[0] == -2.0 and decoded[1] == 1.0


def test_randomness_comes_only_from_the_generator():
    x = torch.randn(500, generator=gen(6))
    torch.manual_seed(1)
    a = quantize(x, 4, 64, gen(7))
    torch.manual_seed(2)
    b = quantize(x, 4, 64, gen(7))
    c = quantize(x, 4, 64, gen(8))
    assert np.array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([0.0, float("nan")]), 8, None, gen())
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(3), 9, None, gen())
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.zeros(3), 8, 0, gen())
    with pytest.raises(ValueError, match="1-d"):
        quantize(torch.zeros(2, 2), 8, None, gen())


def test_four_bit_codes_pack_two_per_byte_low_nibble_first():
    assert pack_codes(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert unpack_codes(np.array([0x21, 0x03], np.uint8), 4, 3).tolist() == [1, 2, 3]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_code_packing_round_trips(bits, numel):
    codes = np.random.default_rng(bits * numel).integers(0, 2**bits, numel, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (packed_nbytes(numel, bits),)
    assert np.array_equal(unpack_codes(packed, bits, numel), codes)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(np.append(packed, np.uint8(0)), bits, numel)
