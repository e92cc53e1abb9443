"""Derived seeds: every random stream in a run comes from `run.seed` and names what it is for.

`numpy.random.SeedSequence` mixes the run seed with the purpose and indices (round, client), so streams
are independent and a run is reproducible. These are for simulation choices (sampling, batch order,
initialisation), never for secrets: those come from `secrets`/`cryptography`.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import torch


def _key(part: int | str) -> int:
    return part if isinstance(part, int) else zlib.crc32(part.encode())


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for the stream named by `parts`, e.g. ("train", round, client_index)."""
    state = np.random.SeedSequence([seed, *(_key(p) for p in parts)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def tensor_key(tensor: torch.Tensor) -> int:
    """A 63-bit integer named by a tensor's exact bytes (blake2b): a `derive_seed` part for a stream that
    must repeat wherever the same tensor is seen (another worker process, a resumed run), e.g. the
    adapter a round starts from."""
    data = tensor.detach().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def numpy_rng(seed: int, *parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))


def torch_generator(seed: int, *parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
