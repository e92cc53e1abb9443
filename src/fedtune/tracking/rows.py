"""What of a row becomes a metric, and of the config a parameter: the names both trackers show.

A row's numbers become metrics at step = its round; a nested mapping of numbers (`refused_messages`,
`client_seconds`) becomes `key/inner` metrics while it has at most `MAX_NESTED` entries (a per-client dict
of a large population is skipped, like lists, strings, flags and missing values). Names keep the
characters MLflow allows, so TensorBoard and MLflow show the same names.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any

STEP_KEY = "round"
MAX_NESTED = 32  # entries of a nested mapping that still become metrics, one each
_NOT_ALLOWED = re.compile(r"[^\w.\- /]")  # MLflow allows letters, digits, _ - . space and /


def metric_name(key: str) -> str:
    """`key` with each character MLflow refuses in a metric name (', !, ...) as '_', and a name that is
    not a plain relative path (`a//b`, `a/../b`) with its '/' as '_' too."""
    name = _NOT_ALLOWED.sub("_", key)
    if posixpath.normpath(name) != name or name.startswith("."):
        name = "_" + name.replace("/", "_") if name.startswith(".") else name.replace("/", "_")
    return name


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one row: its finite numbers, and the numbers of its small nested mappings as
    `key/inner`; the round (the step), strings, lists, flags and None are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == STEP_KEY:
            continue
        if isinstance(value, Mapping):
            if len(value) <= MAX_NESTED:
                for inner, inner_value in value.items():
                    number = _number(inner_value)
                    if number is not None:
                        out[metric_name(f"{key}/{inner}")] = number
            continue
        number = _number(value)
        if number is not None:
            out[metric_name(key)] = number
    return out


def step_of(row: Mapping[str, Any]) -> int:
    """The row's round, the step its metrics are logged at."""
    return int(row[STEP_KEY])


def flat_params(config: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, str]]:
    """`section.key` and the value as text (a string as it is, anything else as JSON), for every key
    of every section that has a value."""
    for section, values in config.items():
        for key, value in values.items():
            if value is not None:
                yield f"{section}.{key}", value if isinstance(value, str) else json.dumps(value)
