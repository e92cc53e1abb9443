"""The run directory: resolved config, metrics.jsonl, per-client evaluation, adapter, report.

All file writes of a run go through here. `metrics.jsonl` is appended and flushed one round at a time,
so a crashed run still shows every completed round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedtune.config import Config, to_toml


def _json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics_file = path / "metrics.jsonl"
        self.adapter_dir = path / "adapter"
        self.clients_file = path / "clients.json"

    def create(self, config: Config) -> None:
        """Start a fresh run directory (an earlier run's metrics are replaced)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.toml").write_text(to_toml(config))
        self.metrics_file.write_text("")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        lines = self.metrics_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_client_eval(self, client_eval: dict[str, dict[str, float]]) -> None:
        self.clients_file.write_text(json.dumps(_json_safe(client_eval), indent=1))
