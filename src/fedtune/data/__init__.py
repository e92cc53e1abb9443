"""Client data: read records, split them into clients, choose the population, cap, split, tokenize.

`load_clients` is the entry point of a simulation. Its steps run in this order, each in its own module:
`sources` (records from a built-in corpus or a file) -> `partition` (natural, iid or dirichlet)
-> `population` (eligibility, sampling, cap, train/eval split) -> `tokens` (one batched call).
Only the chosen, capped examples are tokenized, so large corpora stay fast. The same config,
tokenizer and rng seed give identical clients, sorted by `client_id`.

`load_site` is what one deployed site does with its own file, and a folder source (`data.source` a
directory with one file per client, named by the file) runs exactly that for each file: a simulation of a
pilot then trains on the very examples each site will, so the two can be compared bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedtune.data.partition import dirichlet_partition, group_by_client, iid_partition
from fedtune.data.population import cap_and_shuffle, check_partition_sizes, num_eval, select_natural
from fedtune.data.settings import DataConfig
from fedtune.data.sources import FILE_SUFFIXES, Records, read_file, read_records
from fedtune.data.tokens import tokenize
from fedtune.errors import DataError
from fedtune.seeding import numpy_rng

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ClientData", "load_clients", "load_site", "site_files"]


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
    *,
    seed: int = 0,
) -> list[ClientData]:
    """The federation's clients with tokenized train and eval examples, sorted by client id. A folder
    source loads each chosen file as its site would (`load_site` with the run's `seed`)."""
    if Path(cfg.source).is_dir():
        files = site_files(Path(cfg.source), cfg, num_clients, rng)
        return [load_site(path, cfg, cid, tokenizer, seed) for cid, path in files.items()]
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


def site_files(
    folder: Path, cfg: DataConfig, num_clients: int | Literal["all"], rng: np.random.Generator
) -> dict[str, Path]:
    """A folder source's clients: one file each, named by the file's stem, sorted, the eligible ones (at
    least `data.min_examples` rows) or `num_clients` of them sampled with `rng`."""
    if cfg.partition != "natural" or cfg.client_field is not None:
        raise DataError(
            f"data.source = {cfg.source!r} is a folder, one file per client: it is split already; "
            "use data.partition = 'natural' without data.client_field"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    names = [p.stem for p in files]
    if len(set(names)) != len(names):
        raise DataError(f"{folder} holds two files with one name; name each client's file once")
    if not files:
        raise DataError(f"{folder} has no {', '.join(FILE_SUFFIXES)} files; put one file per client in it")
    sizes = {p.stem: np.arange(len(read_file(p, cfg.text_field).texts)) for p in files}
    chosen = select_natural(sizes, num_clients, cfg.min_examples, rng, cfg.source)
    return {cid: folder / next(p.name for p in files if p.stem == cid) for cid in chosen}


def load_site(
    path: Path,
    cfg: DataConfig,
    client_id: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    text_field: str | None = None,
) -> ClientData:
    """One site's file as one client: capped and shuffled with the site's own stream of the run seed,
    tokenized, split into train and held-out examples. `text_field` defaults to `data.text_field`."""
    text_field = text_field or cfg.text_field
    records = read_file(path, text_field)
    rng = numpy_rng(seed, "site-data", client_id)
    chosen = cap_and_shuffle(np.arange(len(records.texts)), cfg.max_examples_per_client, rng)
    token_ids = tokenize([records.texts[i] for i in chosen.tolist()], tokenizer, cfg.max_seq_len)
    examples = [ids for ids in token_ids if len(ids) >= 2]
    if len(examples) < cfg.min_examples:
        raise DataError(
            f"{path} has {len(examples)} usable examples in field {text_field!r}; this run needs at "
            f"least data.min_examples = {cfg.min_examples}"
        )
    held_out = num_eval(len(examples), cfg.eval_fraction)
    return ClientData(client_id, train=examples[held_out:], eval=examples[:held_out])
