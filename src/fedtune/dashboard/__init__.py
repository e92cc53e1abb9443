"""`fedtune dashboard`: a live page of a run while it happens, for a simulation or a deployment.

It reads the run directory only (`metrics.jsonl`, `config.toml`, a deployment's `state.db` read-only;
`watch`), folds what it read into one typed summary (`summary`) and serves it with the page and its
bundled chart library (uPlot, MIT, in `static/`) from a GET-only HTTP server in a daemon thread
(`server`). The page polls `/api/run` every two seconds and redraws; it is plain HTML and one
hand-written script, with no build step.
"""

from fedtune.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, TOKEN_HEADER, DashboardServer
from fedtune.dashboard.summary import RunSummary
from fedtune.dashboard.watch import RunWatcher

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_HEADER", "DashboardServer", "RunSummary", "RunWatcher"]
