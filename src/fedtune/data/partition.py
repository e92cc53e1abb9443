"""Splitting examples into clients: natural (by client id), iid, Dirichlet label or quantity skew.

Pure, vectorized numpy functions of item indices; randomness comes only from the `rng` argument.
Every function puts every item in exactly one client (natural: every item that has an id) and
returns each client's indices sorted.

The Dirichlet split is the label-skew partition of Hsu et al. (2019): for each label, client
proportions are drawn from Dir(alpha * 1) and the label's shuffled items are cut at the cumulative
proportions. Without labels it is quantity skew, the same cut applied to all items at once. It is
vectorized by placing label k's cumulative proportions on the interval [k, k + 1] and locating
every item there with one `searchsorted`. Small alpha gives skewed clients, large alpha near-iid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def group_by_client(client_ids: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Indices of each client id's items, in item order; items whose id is None are left out."""
    has_id = np.fromiter((cid is not None for cid in client_ids), dtype=bool, count=len(client_ids))
    positions = np.flatnonzero(has_id)
    if positions.size == 0:
        return {}
    ids = np.array([client_ids[i] for i in positions], dtype=str)
    names, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = positions[np.argsort(inverse, kind="stable")]
    return dict(zip(names.tolist(), np.split(order, np.cumsum(counts)[:-1]), strict=True))


def iid_partition(n_items: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle items and deal them into `num_clients` parts whose sizes differ by at most one."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    parts = np.array_split(rng.permutation(n_items), num_clients)
    return [np.sort(part) for part in parts]


def dirichlet_partition(
    labels: np.ndarray | None,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    n_items: int | None = None,
) -> list[np.ndarray]:
    """Label-skew split by `labels` (any sortable values); quantity skew when labels is None.

    Quantity skew has no labels to count items by, so it needs `n_items`.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if labels is None:
        if n_items is None:
            raise ValueError("quantity skew (labels=None) needs n_items")
        labels = np.zeros(n_items, dtype=np.int64)
    _, codes, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    n_items, n_labels = codes.size, counts.size
    if n_items == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(num_clients)]

    # Items grouped by label, shuffled within each label; rank = position within the label's items.
    shuffled = rng.permutation(n_items)
    items = shuffled[np.argsort(codes[shuffled], kind="stable")]
    item_codes = codes[items]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n_items) - starts[item_codes]

    proportions = rng.dirichlet(np.full(num_clients, alpha), size=n_labels)  # [labels, clients]
    cuts = np.cumsum(proportions, axis=1)
    cuts[:, -1] = 1.0  # exact, so label k's cuts end where label k + 1's begin
    cuts += np.arange(n_labels)[:, None]
    position = item_codes + (rank + 0.5) / counts[item_codes]  # in (k, k + 1) for label k
    client = np.searchsorted(cuts.ravel(), position, side="right") - item_codes * num_clients

    order = np.argsort(client, kind="stable")
    sizes = np.bincount(client, minlength=num_clients)
    return [np.sort(part) for part in np.split(items[order], np.cumsum(sizes)[:-1])]
