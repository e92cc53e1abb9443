"""The run directory: resolved config, metrics.jsonl, per-client evaluation, adapter, report (and a
decentralized run's graph.json).

All file writes of a run go through here, in simulation and deployment alike. Typed round results become
JSON rows here (`RoundResult.to_row`); `metrics.jsonl` is appended and flushed one round at a time, so a
crashed run still shows every completed round. `finish` writes what a run ends with: each evaluated
client's loss before and after (`clients.json`) and the report with its plots.

The experiment trackers `[tracking]` turns on (`fedtune.tracking`) observe it: `create` (or a resumed
deployment's `rewrite`, which replays the stored rows into new ones) opens them and gives them the resolved
config, each row appended goes to them as written, `finish` gives them the saved adapter, and `close`
ends a run that stopped before its end.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedtune.config import Config, to_toml
from fedtune.jsonstate import json_safe
from fedtune.report import write_report
from fedtune.round.results import EvalSummary, RoundResult
from fedtune.tracking import TENSORBOARD_DIR, Trackers, open_trackers


def client_changes(before: EvalSummary | None, after: EvalSummary | None) -> dict[str, dict[str, float]]:
    """Each client evaluated at the start: its held-out loss before and after (NaN if it was not then),
    and with its personal adapter at the end when the run has `[personalize]`."""
    if before is None:
        return {}
    end = {} if after is None else after.per_client_loss
    personal = None if after is None or after.personal is None else after.personal.per_client_loss
    changes = {}
    for cid, loss in before.per_client_loss.items():
        changes[cid] = {"before": loss, "after": end.get(cid, math.nan)}
        if personal is not None:
            changes[cid]["personal"] = personal.get(cid, math.nan)
    return changes


def client_dir(root: Path, client_id: str) -> Path:
    """A client's own folder under `root` (its personal adapter, its compare arm): `root/<client id>`,
    an id with '/' (Shakespeare's `play/CHARACTER`) as nested folders, a part that is not a plain name
    %-quoted."""
    parts = []
    for part in client_id.split("/"):
        plain = part not in ("", ".", "..") and all(ch.isalnum() or ch in "._- " for ch in part)
        parts.append(part if plain else quote(part, safe=""))
    return root.joinpath(*parts)


def _targets(setting: list[str] | str) -> str:
    return "auto (the attention projections)" if setting == "auto" else ", ".join(setting)


def summary(
    config: Config, *, num_clients: int, cohort: int, adapter_numel: int, seconds: float
) -> dict[str, str]:
    """The report's settings table."""
    fed = config.federation
    work = f"{fed.local_epochs} epochs" if fed.local_epochs else f"{fed.local_steps} steps"
    return {
        "model": config.model.name,
        "data": f"{config.data.source} ({config.data.partition} split), {num_clients} clients",
        "rounds": f"{fed.rounds} x {cohort} clients",
        "local training": f"{work}, batch {config.train.batch_size}, lr {config.train.lr:g}",
        "LoRA": f"rank {config.lora.rank}, alpha {config.lora.alpha:g}, "
        f"{_targets(config.lora.target_modules)} ({adapter_numel:,} parameters)",
        "aggregation": f"{config.server.rule}, server {config.server.optimizer} lr {config.server.lr:g}",
        "seed": str(config.run.seed),
        "wall time": f"{seconds:.1f} s",
    }


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics_file = path / "metrics.jsonl"
        self.adapter_dir = path / "adapter"
        self.personal_root = path / "personal"
        self.clients_file = path / "clients.json"
        self.graph_file = path / "graph.json"  # a decentralized run's neighbour lists
        self.audit_file = path / "audit.json"  # with [audit]
        self.tensorboard_dir = path / TENSORBOARD_DIR  # with tracking.tensorboard
        self.trackers = Trackers()  # none until `create` or `rewrite` opens what [tracking] asks for

    def create(self, config: Config) -> None:
        """Start a fresh run directory (an earlier run's metrics are replaced; an MLflow store in it
        keeps its earlier runs) and open the run's trackers."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.toml").write_text(to_toml(config))
        self.metrics_file.write_text("")
        shutil.rmtree(self.personal_root, ignore_errors=True)  # an earlier run's personal adapters
        self.graph_file.unlink(missing_ok=True)  # an earlier decentralized run's graph
        self.audit_file.unlink(missing_ok=True)  # an earlier run's audit
        self._track(config)

    def _track(self, config: Config) -> None:
        """Open the trackers `[tracking]` asks for (fresh TensorBoard files) and give them the config."""
        self.trackers.close()
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)
        self.trackers = open_trackers(config.tracking, self.path, run_name=config.run.name)
        self.trackers.log_params(config.model_dump(mode="json", exclude_none=True, by_alias=True))

    def append(self, result: RoundResult) -> None:
        self.append_row(result.to_row())

    def append_row(self, row: dict[str, Any]) -> None:
        safe = json_safe(row)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(safe) + "\n")
        self.trackers.log_row(safe)

    def rewrite(self, config: Config, rows: Sequence[dict[str, Any]]) -> None:
        """Replace config.toml and metrics.jsonl (a resumed deployment's, from its state file); the
        trackers start afresh (a new MLflow run) and are given every stored row again."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.toml").write_text(to_toml(config))
        self.metrics_file.write_text("")
        self._track(config)
        for row in rows:
            self.append_row(row)

    def write_graph(self, neighbours: dict[str, list[str]]) -> None:
        """A decentralized run's communication graph: each client's neighbours, by client id."""
        self.graph_file.write_text(json.dumps(neighbours, indent=1))

    def read_metrics(self) -> list[dict[str, Any]]:
        lines = self.metrics_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_client_eval(self, client_eval: dict[str, dict[str, float]]) -> None:
        self.clients_file.write_text(json.dumps(json_safe(client_eval), indent=1))

    def finish(
        self, client_eval: dict[str, dict[str, float]], *, title: str, settings: dict[str, str]
    ) -> None:
        """clients.json and the report over every row in metrics.jsonl; then the trackers are given the
        saved adapter (call it after `save_adapter`) and closed."""
        self.write_client_eval(client_eval)
        write_report(self.path, self.read_metrics(), client_eval, title=title, summary=settings)
        self.trackers.finish(self.adapter_dir)

    def close(self) -> None:
        """Close the trackers (a run that did not `finish` is marked as stopped); idempotent."""
        self.trackers.close()

    def write_audit(self, audit: dict[str, Any], section: list[str]) -> None:
        """audit.json, and the audit's section at the end of the report (after `finish`)."""
        self.audit_file.write_text(json.dumps(json_safe(audit), indent=1))
        report = self.path / "report.md"
        text = report.read_text(encoding="utf-8") if report.is_file() else ""
        report.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section), encoding="utf-8")
