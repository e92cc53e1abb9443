"""Strict JSON for the state file and the run's rows: NaN and Inf as null, numpy and torch numbers as
Python ones, and a corrupt or unwritable value as a `StateError` that says what to do. No torch here: a
reader of the state file (`fedtune status`, the dashboard) stays light.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fedtune.errors import StateError


def dumps(value: dict[str, Any] | None, what: str) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as err:
        raise StateError(
            f"checkpoint {what} is not JSON-able ({err}); pass plain numbers, strings, lists"
        ) from err


def loads(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StateError(
            f"the {what} in the state file is corrupt ({err}): restore it or start a new run.dir"
        ) from err


def json_safe(value: Any) -> Any:
    """`value` with NaN/Inf floats as None and numpy or torch numbers as Python ones."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, tensors
        return json_safe(value.tolist())
    return value


def metrics_json(metrics: Mapping[str, Any]) -> str:
    try:
        return json.dumps(json_safe(metrics), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StateError(
            f"round metrics are not JSON-able ({err}); report plain numbers and strings"
        ) from err
