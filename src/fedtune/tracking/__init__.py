"""Experiment trackers: TensorBoard event files and MLflow runs, fed from the run directory's rows.

`settings` (the `[tracking]` section and the packages it needs), `rows` (what of a row is a metric, of the
config a parameter), `tracker` (the `Tracker` protocol, the `Trackers` a run holds, `open_trackers`), and
one module per tracker (`tensorboard`, `mlflow`), whose library is imported only when it is turned on.
"""

from fedtune.tracking.rows import MAX_NESTED, metric_name, scalars
from fedtune.tracking.settings import EXTRA, TrackingConfig, missing_packages
from fedtune.tracking.tracker import (
    MLFLOW_ARTIFACTS,
    MLFLOW_DB,
    TENSORBOARD_DIR,
    Tracker,
    Trackers,
    default_mlflow_uri,
    open_trackers,
)

__all__ = [
    "EXTRA",
    "MAX_NESTED",
    "MLFLOW_ARTIFACTS",
    "MLFLOW_DB",
    "TENSORBOARD_DIR",
    "Tracker",
    "Trackers",
    "TrackingConfig",
    "default_mlflow_uri",
    "metric_name",
    "missing_packages",
    "open_trackers",
    "scalars",
]
