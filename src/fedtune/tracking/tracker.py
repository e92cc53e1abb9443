"""The `Tracker` protocol, and `Trackers`: the list of them a run directory tells of what it writes.

A tracker observes the run directory (`fedtune.rundir.RunDir`, where simulation, decentralized runs and
the deployed server all write): it is given the resolved config once, each row as it is appended to
metrics.jsonl, and the final adapter at the end. `open_trackers` makes the ones `[tracking]` asks for.
Closing is best-effort (a failure is logged, not raised: it runs on the way out of a failed run); a
failure to log or to finish is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedtune.tracking.settings import TrackingConfig

log = logging.getLogger("fedtune.tracking")

TENSORBOARD_DIR = "tensorboard"  # under the run directory
MLFLOW_DB = "mlflow.db"  # the default MLflow store, under the run directory
MLFLOW_ARTIFACTS = "mlartifacts"  # the default store's artifacts, beside it


class Tracker(Protocol):
    """One experiment tracker: told of the run's config, each row, then the adapter; closed at the end."""

    def log_params(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        """The resolved config, as its sections' plain values (`Config.model_dump(mode="json")`)."""

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One row of metrics.jsonl, as it is written (NaN already None); cheap: once a round."""

    def finish(self, adapter_dir: Path) -> None:
        """The run ended: keep the final adapter (a PEFT folder) and close."""

    def close(self) -> None:
        """Release what is open; a run closed without `finish` stopped before its end. Idempotent."""


class Trackers:
    """The run's trackers, told of everything in order (none: every call does nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log_params(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        for tracker in self.trackers:
            tracker.log_params(config)

    def log_row(self, row: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_row(row)

    def finish(self, adapter_dir: Path) -> None:
        try:
            for tracker in self.trackers:
                tracker.finish(adapter_dir)
        finally:
            self.close()

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as err:  # every tracker is closed; a failed run's own error comes first
                log.warning("closing %s failed: %s", type(tracker).__name__, err)


def default_mlflow_uri(run_dir: Path) -> str:
    """The SQLite store MLflow writes to when `tracking.mlflow_uri` is not given."""
    return f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"


def artifact_dir(uri: str | None, run_dir: Path) -> Path | None:
    """Where a new MLflow experiment keeps its artifacts: beside a SQLite file (the default one is in the
    run directory), in the run directory for another database, and where a tracking server puts them
    (None) for a server. MLflow's own default for a database is ./mlruns in the working directory."""
    if uri is not None and uri.split(":", 1)[0] in ("http", "https", "databricks", "databricks-uc"):
        return None
    if uri is not None and uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / MLFLOW_ARTIFACTS
    return run_dir / MLFLOW_ARTIFACTS


def open_trackers(tracking: TrackingConfig, run_dir: Path, *, run_name: str) -> Trackers:
    """The trackers `tracking` turns on for the run in `run_dir` (its MLflow run named `run_name`, in the
    experiment `tracking.mlflow_experiment`, by default `run_name`)."""
    opened: list[Tracker] = []
    try:
        if tracking.tensorboard:
            from fedtune.tracking.tensorboard import TensorBoardTracker

            opened.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR))
        if tracking.mlflow:
            from fedtune.tracking.mlflow import open_mlflow

            uri = tracking.mlflow_uri
            opened.append(
                open_mlflow(
                    default_mlflow_uri(run_dir) if uri is None else uri,
                    tracking.mlflow_experiment or run_name,
                    run_name=run_name,
                    artifact_dir=artifact_dir(uri, run_dir),
                    tags={"fedtune.run_dir": str(run_dir.resolve())},
                )
            )
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
