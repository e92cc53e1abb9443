"""Client data: read records, split them into clients, choose the population, cap, split, tokenize.

`load_clients` is the one entry point. Its steps run in this order, each in its own module:
`sources` (records from a built-in corpus or a file) -> `partition` (natural, iid or dirichlet)
-> `population` (eligibility, sampling, cap, train/eval split) -> `tokens` (one batched call).
Only the chosen, capped examples are tokenized, so large corpora stay fast. The same config,
tokenizer and rng seed give identical clients, sorted by `client_id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedtune.config import DataConfig
from fedtune.data.partition import dirichlet_partition, group_by_client, iid_partition
from fedtune.data.population import cap_and_shuffle, check_partition_sizes, num_eval, select_natural
from fedtune.data.sources import Records, read_records
from fedtune.data.tokens import tokenize
from fedtune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ClientData", "load_clients"]


@dataclass(frozen=True)
class ClientData:
    """One client's token ids: one list per example, each 2 to `max_seq_len` tokens long."""

    client_id: str
    train: list[list[int]]
    eval: list[list[int]]  # held-out examples of the same client


def _partition(
    records: Records,
    cfg: DataConfig,
    num_clients: int | Literal["all"],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Record indices of each client of the population."""
    if cfg.partition == "natural":
        if records.client_ids is None:
            raise DataError(
                f"data.partition = 'natural' needs client ids, and {cfg.source!r} has none; "
                "set data.client_field or use partition = 'iid' or 'dirichlet'"
            )
        groups = group_by_client(records.client_ids)
        return select_natural(groups, num_clients, cfg.min_examples, rng, cfg.source)
    if num_clients == "all":
        raise DataError(
            f"data.partition = {cfg.partition!r} needs a number of clients; "
            "set federation.num_clients to an integer"
        )
    n_items = len(records.texts)
    if cfg.partition == "iid":
        parts = iid_partition(n_items, num_clients, rng)
    else:
        parts = dirichlet_partition(records.labels, num_clients, cfg.dirichlet_alpha, rng, n_items=n_items)
    width = len(str(num_clients - 1))
    named = {f"client-{i:0{width}d}": indices for i, indices in enumerate(parts)}
    check_partition_sizes(named, cfg.min_examples, cfg.partition)
    return named


def load_clients(
    cfg: DataConfig,
    num_clients: int | Literal["all"],
    tokenizer: PreTrainedTokenizerBase,
    rng: np.random.Generator,
) -> list[ClientData]:
    """The federation's clients with tokenized train and eval examples, sorted by client id."""
    records = read_records(cfg)
    parts = _partition(records, cfg, num_clients, rng)
    chosen = {cid: cap_and_shuffle(parts[cid], cfg.max_examples_per_client, rng) for cid in sorted(parts)}
    texts = [records.texts[i] for indices in chosen.values() for i in indices.tolist()]
    token_ids = tokenize(texts, tokenizer, cfg.max_seq_len)

    clients: list[ClientData] = []
    start = 0
    for cid, indices in chosen.items():
        examples = [ids for ids in token_ids[start : start + indices.size] if len(ids) >= 2]
        start += indices.size
        if len(examples) < 2:
            raise DataError(
                f"client {cid!r} of {cfg.source!r} has {len(examples)} examples of at least "
                "2 tokens, too few for a train/eval split; raise data.min_examples"
            )
        held_out = num_eval(len(examples), cfg.eval_fraction)
        clients.append(ClientData(cid, train=examples[held_out:], eval=examples[:held_out]))
    return clients
