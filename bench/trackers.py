"""The experiment trackers' cost per round: the time of their per-round call against the round's seconds.

Runs the job (`make run`'s, SmolLM2-135M, unless `--set` changes it) in simulation with
`tracking.tensorboard` and `tracking.mlflow` on (MLflow's default SQLite store in the run directory). Each
tracker is wrapped in a timer around every call the run directory makes to it, so what is timed is what a
round waits for: each round's `log_row` (TensorBoard queues scalars for its writer thread; MLflow queues
the round's metrics for its own), next to the round's `seconds` from metrics.jsonl. Target: under 1% of
the round. Also reported: opening both on a fresh store with the params (once per run: MLflow creates its
SQLite tables), the end (`finish`: the rest of the queue, the adapter artifact), and the write MLflow's
writer thread does per round (the same rows logged again synchronously), which overlaps training.

    .venv/bin/python bench/trackers.py                            # SmolLM2-135M, the default job
    .venv/bin/python bench/trackers.py --set model.name=tiny      # a quick look

Writes bench/results/trackers-<model>.json (with the load average before and after). Run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedtune.config import load_config
from fedtune.simulation import Silent, run_setup, setup
from fedtune.tracking import Tracker, default_mlflow_uri, open_trackers, scalars

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = Path("bench/out/trackers")
RESULTS = Path("bench/results")


class Timed:
    """A tracker with the seconds of each of its calls, by method."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.seconds: dict[str, list[float]] = {"log_params": [], "log_row": [], "finish": [], "close": []}

    def _timed(self, method: str, *args: Any) -> None:
        started = time.perf_counter()
        getattr(self.tracker, method)(*args)
        self.seconds[method].append(time.perf_counter() - started)

    def log_params(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        self._timed("log_params", config)

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._timed("log_row", row)

    def finish(self, adapter_dir: Path) -> None:
        self._timed("finish", adapter_dir)

    def close(self) -> None:
        self._timed("close")


def opening_seconds(config, folder: Path) -> float:
    """Both trackers opened on a fresh store in `folder`, given the params, and closed."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    trackers = open_trackers(config.tracking, folder, run_name="opening")
    trackers.log_params(config.model_dump(mode="json", exclude_none=True, by_alias=True))
    seconds = time.perf_counter() - started
    trackers.close()
    return seconds


def mlflow_write_seconds(run_dir: Path, rows: list[dict]) -> list[float]:
    """Each row's metrics logged synchronously to a new run of the run's store: the writer thread's work."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_mlflow_uri(run_dir))
    experiment_id = client.create_experiment("bench-trackers-writes")  # a fresh store: the run's own
    run_id = client.create_run(experiment_id).info.run_id
    out = []
    for row in rows:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["round"]) for k, v in scalars(row).items()]
        started = time.perf_counter()
        client.log_batch(run_id, metrics=metrics)
        out.append(time.perf_counter() - started)
    client.set_terminated(run_id, "FINISHED")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    overrides = [
        *args.overrides,
        f"run.dir={OUT / 'run'}",
        "tracking.tensorboard=true",
        "tracking.mlflow=true",
    ]
    config = load_config(None, overrides)
    load_before = os.getloadavg()[0]
    shutil.rmtree(OUT, ignore_errors=True)
    opening = opening_seconds(config, OUT / "opening")

    started = time.perf_counter()
    s = setup(config, Silent(), print)
    timed = [Timed(t) for t in s.run_dir.trackers.trackers]
    s.run_dir.trackers.trackers = list(timed)
    try:
        result = run_setup(s, Silent(), started)
    finally:
        s.close()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    names = [type(t.tracker).__name__ for t in timed]
    per_round = []
    for i, row in enumerate(rows):
        calls = {name: t.seconds["log_row"][i] for name, t in zip(names, timed, strict=True)}
        total = sum(calls.values())
        per_round.append(
            {"round": row["round"], "round_seconds": row["seconds"], "tracker_seconds": calls,
             "share": total / row["seconds"]}
        )  # fmt: skip
    writes = mlflow_write_seconds(result.run_dir, rows)
    trained = [r for r in per_round if r["round"] > 0]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        "model": config.model.name,
        "rounds": len(rows) - 1,
        "metrics_per_row": [len(scalars(r)) for r in rows],
        "opening_with_params_seconds": opening,
        "per_round": per_round,
        "max_share_of_a_training_round": max(r["share"] for r in trained),
        "mean_share_of_a_training_round": statistics.mean(r["share"] for r in trained),
        "finish_seconds": {name: t.seconds["finish"][0] for name, t in zip(names, timed, strict=True)},
        "mlflow_write_seconds_per_round": writes,
        "mlflow_write_share_of_a_training_round": max(
            w / r["round_seconds"] for w, r in zip(writes, per_round, strict=True) if r["round"] > 0
        ),
    }
    report["load_before"], report["load_after"] = load_before, os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"trackers-{config.model.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"machine: {report['machine']}; {config.model.name}, {report['rounds']} rounds")
    print(f"opening both trackers on a fresh store, with the params: {opening:.2f} s (once per run)")
    print("round  round s  " + "  ".join(f"{n} ms" for n in names) + "  share of the round")
    for r in per_round:
        ms = "  ".join(f"{r['tracker_seconds'][n] * 1e3:>{len(n) + 3}.3f}" for n in names)
        print(f"{r['round']:>5}  {r['round_seconds']:>7.2f}  {ms}  {r['share'] * 100:.3f}%")
    print(
        f"per-round calls: at most {report['max_share_of_a_training_round'] * 100:.3f}% of a training "
        f"round (mean {report['mean_share_of_a_training_round'] * 100:.3f}%; target < 1%)"
    )
    print(
        "finish (the queue's rest, the adapter artifact): "
        + ", ".join(f"{n} {sec:.3f} s" for n, sec in report["finish_seconds"].items())
    )
    print(
        f"MLflow's write per round, in its writer thread: at most {max(writes) * 1e3:.1f} ms "
        f"({report['mlflow_write_share_of_a_training_round'] * 100:.2f}% of a training round)"
    )


if __name__ == "__main__":
    main()
