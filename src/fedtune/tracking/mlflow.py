"""MLflow: the resolved config as params, each row's metrics at step = round, the final adapter as an
artifact.

Talks to the store through `MlflowClient` only (no fluent API, so no process-wide active run). The default
store is SQLite in the run directory (`sqlite:///<run dir>/mlflow.db`, artifacts in `mlartifacts/` beside
it): MLflow 3 refuses its old file store unless told otherwise. A round's call only builds its metrics and
queues them; one writer thread sends them in order (a SQLite commit or an HTTP request), so training does
not wait on the store; a failed write is raised at the next call. The params are `section.key` (a value
MLflow would refuse as too long is cut, and says so), and the exact config is the run's `config.toml`
artifact; the adapter goes to `adapter/` at the end, a PEFT folder `PeftModel.from_pretrained` loads.
A run closed before its end is marked KILLED, one whose end could not be logged FAILED. MLflow's usage
telemetry is off unless MLFLOW_DISABLE_TELEMETRY is set otherwise.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from fedtune.errors import ConfigError, TrackingError
from fedtune.tracking.rows import flat_params, scalars, step_of

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

# read when mlflow is first imported, which this module does only after it is itself imported
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_CUT = " ... (cut; the whole config is the run's config.toml artifact)"


def open_mlflow(
    uri: str, experiment: str, *, run_name: str, artifact_dir: Path | None, tags: Mapping[str, str]
) -> MlflowTracker:
    """A new MLflow run named `run_name` in `experiment` (created if new, its artifacts in `artifact_dir`
    when given, else where the store puts them) at tracking URI `uri`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = None if artifact_dir is None else artifact_dir.resolve().as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        elif found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"tracking.mlflow_experiment: the MLflow experiment {experiment!r} at {uri} is deleted; "
                "restore it (`mlflow experiments restore`) or name another experiment"
            )
        else:
            experiment_id = found.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except MlflowException as err:
        raise ConfigError(
            f"tracking.mlflow_uri: MLflow could not open a run at {uri}: {err.message}; fix the URI "
            "(sqlite:///PATH/mlflow.db, or a tracking server's http(s)://HOST:PORT) or leave it unset for "
            "a store in the run directory"
        ) from None
    return MlflowTracker(client, run.info.run_id)


class MlflowTracker:
    def __init__(self, client: MlflowClient, run_id: str) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH

        self.client, self.run_id = client, run_id
        self._open = True  # until finished or closed
        self._max_metrics, self._max_param = MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH
        self._pending: queue.Queue[list[Metric] | None] = queue.Queue()
        self._error: Exception | None = None
        self._writer: threading.Thread | None = threading.Thread(
            target=self._write, name="fedtune-mlflow", daemon=True
        )
        self._writer.start()

    def log_params(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(key, self._fit(value)) for key, value in flat_params(config)]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_text(self.run_id, tomli_w.dumps(config), "config.toml")

    def _fit(self, value: str) -> str:
        return value if len(value) <= self._max_param else value[: self._max_param - len(_CUT)] + _CUT

    def log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        self._raise_failed()
        step, now_ms = step_of(row), int(time.time() * 1000)
        metrics = [Metric(name, value, now_ms, step) for name, value in scalars(row).items()]
        for start in range(0, len(metrics), self._max_metrics):
            self._pending.put(metrics[start : start + self._max_metrics])

    def _write(self) -> None:
        while (metrics := self._pending.get()) is not None:
            if self._error is None:  # after a failure, the rest is dropped: it is raised at the next call
                try:
                    self.client.log_batch(self.run_id, metrics=metrics)
                except Exception as err:
                    self._error = err

    def _drain(self) -> None:
        """Wait for the queued metrics to be written."""
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join()
            self._writer = None

    def _raise_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise TrackingError(f"MLflow: logging a round's metrics to run {self.run_id} failed: {error}")

    def finish(self, adapter_dir: Path) -> None:
        self._drain()
        self._open = False
        try:
            self._raise_failed()
            self.client.log_artifacts(self.run_id, str(adapter_dir), artifact_path="adapter")
        except BaseException:
            self.client.set_terminated(self.run_id, "FAILED")
            raise
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        self._drain()
        if self._open:  # not finished: the run stopped before its end (an error, or a stopped server)
            self._open = False
            self.client.set_terminated(self.run_id, "KILLED")
            self._raise_failed()
