"""The `[tracking]` config section: experiment trackers that watch a run's rows (TensorBoard, MLflow).

Both are optional extras (`pip install 'fedtune[tracking]'`). A setting that only MLflow reads, given while
`mlflow` is off, is refused at load; a tracker whose package is not installed is refused when a run starts
(`missing_packages`), before the model loads: a deployed site validates the server's config too and need
not have the server's trackers.
"""

from __future__ import annotations

import importlib.util

from pydantic import Field, model_validator

from fedtune.section import Section

EXTRA = "pip install 'fedtune[tracking]'"


class TrackingConfig(Section):
    """Where a run's rows go besides metrics.jsonl."""

    tensorboard: bool = False  # event files under <run dir>/tensorboard
    mlflow: bool = False  # params, per-round metrics, the final adapter as an artifact
    # default: a SQLite store in the run directory, sqlite:///<run dir>/mlflow.db (artifacts beside it)
    mlflow_uri: str | None = Field(None, min_length=1)
    mlflow_experiment: str | None = Field(None, min_length=1)  # default: run.name

    @model_validator(mode="after")
    def _mlflow_settings_need_mlflow(self) -> TrackingConfig:
        if not self.mlflow:
            for key in ("mlflow_uri", "mlflow_experiment"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"tracking.{key} is set but tracking.mlflow is false: set tracking.mlflow = true "
                        f"to log to MLflow, or remove tracking.{key}"
                    )
        return self


def is_sqlite(uri: str | None) -> bool:
    """Whether MLflow stores the run in SQLite (the default, or a `sqlite:` URI): that needs SQLAlchemy."""
    return uri is None or uri.startswith("sqlite:")


def missing_packages(tracking: TrackingConfig) -> list[str]:
    """The packages the enabled trackers need that are not installed (empty: they can run)."""
    needed = []
    if tracking.tensorboard:
        needed.append("tensorboard")
    if tracking.mlflow:
        needed.append("mlflow")
        if is_sqlite(tracking.mlflow_uri):
            needed += ["sqlalchemy", "alembic"]
    return [name for name in needed if not installed(name)]


def installed(package: str) -> bool:
    """Whether `package` can be imported here (without importing it)."""
    return importlib.util.find_spec(package) is not None
