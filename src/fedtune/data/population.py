"""The client population and each client's examples: eligibility, sampling, cap, train/eval split.

Clients with fewer than `data.min_examples` examples are never trained on. For a natural split the
population is sampled from the eligible clients, sorted by id first so the same seed picks the same
clients; for iid and dirichlet splits every partition must be eligible, or the run is refused with
the settings to change. Randomness comes only from the `rng` argument.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedtune.errors import DataError

_SHOWN = 5  # partitions named in an error message


def select_natural(
    groups: dict[str, np.ndarray],
    num_clients: int | Literal["all"],
    min_examples: int,
    rng: np.random.Generator,
    source: str,
) -> dict[str, np.ndarray]:
    """The eligible clients (all of them, or `num_clients` sampled with `rng`), sorted by id."""
    eligible = sorted(cid for cid, indices in groups.items() if indices.size >= min_examples)
    where = (
        f"{len(eligible)} of the {len(groups)} clients in {source!r} have at least "
        f"data.min_examples = {min_examples} examples"
    )
    if num_clients == "all":
        if not eligible:
            raise DataError(f"{where}; lower data.min_examples")
        return {cid: groups[cid] for cid in eligible}
    if len(eligible) < num_clients:
        raise DataError(
            f"{where}, fewer than federation.num_clients = {num_clients}; "
            "lower federation.num_clients or data.min_examples"
        )
    chosen = np.sort(rng.choice(len(eligible), num_clients, replace=False))
    return {eligible[i]: groups[eligible[i]] for i in chosen.tolist()}


def check_partition_sizes(
    parts: dict[str, np.ndarray], min_examples: int, partition: Literal["iid", "dirichlet"]
) -> None:
    """Refuse a synthetic split in which some partition has fewer than `min_examples` examples."""
    small = [(cid, indices.size) for cid, indices in parts.items() if indices.size < min_examples]
    if not small:
        return
    shown = ", ".join(f"{cid} ({size})" for cid, size in small[:_SHOWN])
    more = f" and {len(small) - _SHOWN} more" if len(small) > _SHOWN else ""
    fix = (
        "raise data.dirichlet_alpha, lower data.min_examples or lower federation.num_clients"
        if partition == "dirichlet"
        else "lower federation.num_clients or data.min_examples"
    )
    raise DataError(
        f"data.partition = {partition!r} left {len(small)} of {len(parts)} clients with fewer than "
        f"data.min_examples = {min_examples} examples: {shown}{more}; {fix}"
    )


def cap_and_shuffle(
    indices: np.ndarray, max_examples: int | Literal["all"], rng: np.random.Generator
) -> np.ndarray:
    """A uniformly random subset of at most `max_examples` indices, in random order."""
    shuffled = rng.permutation(indices)
    return shuffled if max_examples == "all" else shuffled[:max_examples]


def num_eval(num_examples: int, eval_fraction: float) -> int:
    """Examples held out of `num_examples`: `eval_fraction`, rounded, leaving at least 1 of each."""
    return min(num_examples - 1, max(1, round(eval_fraction * num_examples)))
