"""Sparsification: top-k keeps the k largest magnitudes; random-k picks the same coordinates from one seed."""

import numpy as np
import pytest
import torch

from fedtune.compress import sparsify
from fedtune.compress.sparsify import (
    decode_indices,
    densify,
    encode_indices,
    num_kept,
    randomk_indices,
    topk_indices,
)

SEED_A = bytes(range(32))
SEED_B = bytes(range(1, 33))


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    k = 100
    idx = topk_indices(x, k)
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == k
    expected = torch.argsort(x.abs(), descending=True)[:k].sort().values
    assert torch.equal(idx, expected)
    dropped = torch.ones(10_000, dtype=torch.bool)
    dropped[idx] = False
    assert x[idx].abs().min() > x[dropped].abs().max()
    assert torch.equal(topk_indices(x, 10_000), torch.arange(10_000))


def test_randomk_is_the_same_on_every_client_of_a_seed_and_differs_across_seeds():
    a = randomk_indices(SEED_A, 50_000, 500)
    sparsify._randomk.cache_clear()  # a second client computes it afresh
    b = randomk_indices(SEED_A, 50_000, 500)
    c = randomk_indices(SEED_B, 50_000, 500)
    assert torch.equal(a, b)
    assert a.shape == (500,) and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 500
    assert int(a[0]) >= 0 and int(a[-1]) < 50_000
    assert len(set(a.tolist()) & set(c.tolist())) < 50  # about k * k / d = 5 in common by chance
    a[0] = -1  # callers get their own copy, not the cached one
    assert int(randomk_indices(SEED_A, 50_000, 500)[0]) >= 0


def test_randomk_picks_every_coordinate_about_equally_often():
    counts = np.zeros(100)
    for s in range(400):
        counts[randomk_indices(s.to_bytes(32, "little"), 100, 10).numpy()] += 1
    assert counts.sum() == 4000 and counts.min() > 15 and counts.max() < 70  # 40 expected each


def test_randomk_edges_and_bad_seeds():
    assert torch.equal(randomk_indices(SEED_A, 10, 10), torch.arange(10))
    assert randomk_indices(SEED_A, 10, 0).shape == (0,)
    with pytest.raises(ValueError, match="32 bytes"):
        randomk_indices(b"short", 10, 1)
    with pytest.raises(ValueError, match="k must"):
        randomk_indices(SEED_A, 10, 11)


def test_num_kept_rounds_and_stays_in_range():
    assert num_kept(921_600, 0.01) == 9216
    assert num_kept(10, 0.01) == 1
    assert num_kept(10, 1.0) == 10
    assert num_kept(0, 0.5) == 0
    with pytest.raises(ValueError):
        num_kept(10, 0.0)


@pytest.mark.parametrize(
    ("indices", "width"),
    [([], 1), ([0], 1), ([3, 4, 200], 1), ([0, 256, 300], 2), ([5, 70_000, 70_001], 4), ([2**32 - 1], 4)],
)
def test_indices_round_trip_in_the_narrowest_width(indices, width):
    idx = torch.tensor(indices, dtype=torch.int64)
    data, got_width = encode_indices(idx)
    assert got_width == width and len(data) == len(indices) * width
    assert torch.equal(decode_indices(data, len(indices), width, 2**32), idx)


def test_index_gaps_are_laid_out_byte_plane_by_byte_plane():
    data, width = encode_indices(torch.tensor([1, 258, 260]))  # gaps 1, 257, 2
    assert width == 2 and data == bytes([1, 1, 2, 0, 1, 0])  # low bytes, then high bytes


def test_bad_indices_are_refused():
    data, width = encode_indices(torch.tensor([3, 5, 9]))
    with pytest.raises(ValueError, match="below"):
        decode_indices(data, 3, width, 9)
    repeated, _ = encode_indices(torch.tensor([3, 5, 9]))
    repeated = repeated[:1] + bytes([0]) + repeated[2:]  # a zero gap repeats an index
    with pytest.raises(ValueError, match="increasing"):
        decode_indices(repeated, 3, width, 100)
    with pytest.raises(ValueError, match="take"):
        decode_indices(data[:-1], 3, width, 100)
    with pytest.raises(ValueError, match="width"):
        decode_indices(data, 1, 3, 100)


def test_densify_scatters_and_scales():
    out = densify(torch.tensor([1, 3]), torch.tensor([2.0, -1.0]), 5, scale=2.5)
    assert out.tolist() == [0.0, 5.0, 0.0, -2.5, 0.0]
