"""The `[data]` config section: where client data comes from and how it is split and tokenized."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fedtune.section import PositiveInt, Section

BUILTIN_SOURCES = ("shakespeare", "chat")
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class DataConfig(Section):
    """Where client data comes from and how it is split into clients and tokenized."""

    # shakespeare | chat | a .jsonl/.csv/.parquet file | a folder with one such file per client
    source: str = Field("shakespeare", min_length=1)
    text_field: str = "text"
    client_field: str | None = None  # natural split for files; without it, `partition` is used
    partition: Literal["natural", "iid", "dirichlet"] = "natural"
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    label_field: str | None = None  # dirichlet over this label; without it, over quantity
    min_examples: int = Field(8, ge=2)  # clients with fewer examples are left out
    max_examples_per_client: PositiveInt | Literal["all"] = 256
    eval_fraction: Fraction = 0.2
    max_seq_len: int = Field(64, ge=8)  # tokens per example; longer text is truncated
    seed: int | None = Field(None, ge=0)  # the clients, their caps and splits; None: run.seed
