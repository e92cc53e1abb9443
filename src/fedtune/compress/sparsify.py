"""Sparsification: keep k of an update's d coordinates, by magnitude (top-k) or from a shared seed (random-k).

Top-k keeps the k largest magnitudes; its indices depend on the client's data, so they are sent: sorted,
as gaps (the first index, then differences) in the narrowest unsigned width that holds the largest gap,
laid out byte plane by byte plane (all low bytes, then all high bytes). zstd then takes them to about
2 + log2(d/k) bits each, the entropy of the gaps, close to Elias-Fano: measured at d = 921,600 and
k = 1%, 8.8 bits per index against 25 for uint32 + zstd and 10.1 for interleaved uint16 gaps + zstd.

Random-k draws its coordinates from a 32-byte seed the server sends for the round, so every client of the
round keeps the same coordinates and sends only the k values: secure aggregation can then mask and sum
just those. The choice is the k smallest of (AES-256-CTR word, index) over all d coordinates (the
keystream of `fedtune.secagg.prg`), which is portable across machines and library versions, unlike
torch's or numpy's generators, and vectorized. Two ways to use it: biased (the kept values as they are,
the rest carried by error feedback on the client), or unbiased (`rescale`: the server multiplies by d/k,
so E[update] = delta, at the cost of a variance d/k times larger; never together with error feedback,
whose residual would then carry -(d/k - 1) times the kept values).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedtune.secagg.prg import SEED_BYTES, expand

INDEX_WIDTHS = (1, 2, 4)  # bytes per gap


def num_kept(numel: int, fraction: float) -> int:
    """k for a fraction of d coordinates: rounded, at least 1 (for a non-empty vector), at most d."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction}")
    return min(numel, max(1 if numel else 0, round(fraction * numel)))


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (sorted, int64) of the k largest |x|; ties are broken arbitrarily."""
    if not 0 <= k <= x.shape[0]:
        raise ValueError(f"k must be 0 to {x.shape[0]}, got {k}")
    if k == x.shape[0]:
        return torch.arange(k)
    return torch.topk(x.abs(), k, sorted=False).indices.sort().values


def randomk_indices(seed: bytes, numel: int, k: int) -> torch.Tensor:
    """The k coordinates (sorted, int64) that every client of a round keeps, from the round's shared seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a random-k seed is {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= k <= numel:
        raise ValueError(f"k must be 0 to {numel}, got {k}")
    return _randomk(bytes(seed), numel, k).clone()


@lru_cache(maxsize=4)  # a round's clients and its server all ask for the same seed
def _randomk(seed: bytes, numel: int, k: int) -> torch.Tensor:
    if k == numel:
        return torch.arange(numel)
    keys = expand(seed, numel).astype(np.uint64) << np.uint64(32)
    keys |= np.arange(numel, dtype=np.uint64)  # unique keys: the k smallest are one well-defined set
    chosen = np.argpartition(keys, k - 1)[:k] if k else np.empty(0, np.int64)
    return torch.from_numpy(np.sort(chosen).astype(np.int64))


def densify(indices: torch.Tensor, values: torch.Tensor, numel: int, scale: float = 1.0) -> torch.Tensor:
    """A dense vector of `numel` zeros with `values * scale` at `indices`: float32, or float64 when the
    values are (a securely summed update keeps its precision)."""
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.zeros(numel, dtype=dtype)
    out[indices] = values.to(dtype) if scale == 1.0 else values.to(dtype) * scale
    return out


def encode_indices(indices: torch.Tensor) -> tuple[bytes, int]:
    """(bytes, width): sorted distinct indices as gaps in `width` bytes each, one byte plane after another."""
    idx = indices.numpy().astype(np.int64, copy=False)
    if idx.shape[0] == 0:
        return b"", 1
    gaps = np.diff(idx, prepend=0)
    gaps[0] = idx[0]
    largest = int(gaps.max())
    width = next(w for w in INDEX_WIDTHS if largest < 256**w)
    planes = gaps.astype(f"<u{width}").view(np.uint8).reshape(-1, width).T
    return planes.tobytes(), width


def decode_indices(data: bytes | memoryview, count: int, width: int, numel: int) -> torch.Tensor:
    """The inverse of `encode_indices`; raises ValueError unless they are strictly increasing and < numel."""
    if width not in INDEX_WIDTHS:
        raise ValueError(f"an index width is one of {INDEX_WIDTHS} bytes, got {width}")
    if len(data) != count * width:
        raise ValueError(f"{count} indices of {width} bytes take {count * width} bytes, got {len(data)}")
    planes = np.frombuffer(data, np.uint8).reshape(width, count)
    gaps = np.ascontiguousarray(planes.T).view(f"<u{width}").reshape(count).astype(np.int64)
    if count and (np.any(gaps[1:] == 0) or int(gaps.max()) >= numel or int(gaps.sum()) >= numel):
        raise ValueError(f"indices must be strictly increasing and below {numel}")
    return torch.from_numpy(np.cumsum(gaps))
