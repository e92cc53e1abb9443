"""Experiment trackers: what of a row becomes a metric, the config's refusals, and runs read back with
TensorBoard's and MLflow's own readers (a tiny simulation with both, a decentralized run, a stopped and a
resumed run directory, a failing MLflow store)."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.config import check, load_config
from fedtune.decentral import run_decentralized
from fedtune.errors import ConfigError, TrackingError
from fedtune.rundir import RunDir
from fedtune.simulation import simulate
from fedtune.tracking import MAX_NESTED, metric_name, scalars
from fedtune.tracking.settings import installed

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before this file's own imports of mlflow
EXTRA = "pip install 'fedtune[tracking]'"
needs_tensorboard = pytest.mark.skipif(not installed("tensorboard"), reason=f"no tensorboard: {EXTRA}")
needs_mlflow = pytest.mark.skipif(
    not all(installed(p) for p in ("mlflow", "sqlalchemy", "alembic")),
    reason=f"no mlflow (with sqlalchemy and alembic): {EXTRA}",
)

TINY = [
    "model.name=tiny",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=4",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "federation.local_steps=2",
    "eval.every=1",
    "eval.max_examples_per_client=4",
    "simulation.backend=serial",
    "run.threads=1",
    "lora.target_modules=['q_proj', 'v_proj']",
]
BOTH = ["tracking.tensorboard=true", "tracking.mlflow=true"]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numeric(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each top-level number of the rows, by key: (round, value) wherever it is a finite number."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "round" and type(value) in (int, float) and math.isfinite(value):
                out.setdefault(key, []).append((row["round"], float(value)))
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id], order_by=["attribute.start_time ASC"])
    return client, runs


# ---- rows and config, no model -------------------------------------------------------------------------


def test_a_rows_finite_numbers_and_small_nested_numbers_become_metrics():
    big = {f"c{i}": 1.0 for i in range(MAX_NESTED + 1)}
    row = {
        "round": 3,
        "clients": 2,
        "eval_loss": 1.25,
        "train_loss": None,
        "nan_loss": math.nan,
        "round_failed": None,
        "unsafe": True,
        "client_ids": ["a", "b"],
        "refused_messages": {"bad_update": 2, "note": "text"},
        "eval_loss_per_client": {"hamlet/HAMLET": 0.5, "lear/KING LEAR's fool": 0.75},
        "client_seconds": big,
    }
    assert scalars(row) == {
        "clients": 2.0,
        "eval_loss": 1.25,
        "refused_messages/bad_update": 2.0,
        "eval_loss_per_client/hamlet/HAMLET": 0.5,
        "eval_loss_per_client/lear/KING LEAR_s fool": 0.75,
    }
    assert metric_name("a//b") == "a__b" and metric_name("../x") == "_.._x"


@pytest.mark.parametrize("key", ["mlflow_uri", "mlflow_experiment"])
def test_an_mlflow_setting_without_mlflow_is_refused_at_load(key):
    with pytest.raises(ConfigError, match=f"tracking.{key} is set but tracking.mlflow is false.*true"):
        load_config(None, [f"tracking.{key}='x'"])


def test_a_tracker_whose_package_is_missing_is_refused_when_the_run_starts(monkeypatch, tmp_path):
    monkeypatch.setattr("fedtune.tracking.settings.installed", lambda name: name != "mlflow")
    config = load_config(None, [*TINY, *BOTH, f"run.dir={tmp_path / 'run'}"])  # a site may validate it
    with pytest.raises(ConfigError, match=r"tracking.tensorboard = true and tracking.mlflow = true need ml"):
        check(config, "simulate")

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model loaded before the config was refused")

    monkeypatch.setattr("fedtune.simulation.run.load_model", no_model)
    with pytest.raises(
        ConfigError, match=r"need mlflow, not installed here: pip install 'fedtune\[tracking\]'"
    ):
        simulate(config)
    assert not (tmp_path / "run" / "config.toml").exists()


# ---- a tiny simulation with both trackers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    if not (installed("tensorboard") and installed("mlflow") and installed("sqlalchemy")):
        pytest.skip(f"the trackers are not installed: {EXTRA}")
    out = tmp_path_factory.mktemp("tracked")
    config = load_config(None, [*TINY, *BOTH, "run.name=tracked", f"run.dir={out / 'run'}"])
    return config, simulate(config)


def store_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


@needs_tensorboard
@needs_mlflow
def test_tensorboard_holds_every_rounds_numbers_as_metrics_jsonl_has_them(tracked_run):
    _, result = tracked_run
    rows = rows_of(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    scalars_read = tensorboard_scalars(result.run_dir / "tensorboard")
    expected = numeric(rows)
    assert {"eval_loss", "train_loss", "bytes_up", "seconds"} <= set(expected)
    assert set(scalars_read) == set(expected)  # this run has no nested numbers
    for tag, points in expected.items():
        assert [step for step, _ in scalars_read[tag]] == [step for step, _ in points]
        assert [v for _, v in scalars_read[tag]] == pytest.approx([v for _, v in points], rel=1e-6)  # float32
    assert [step for step, _ in scalars_read["train_loss"]] == [1, 2]  # round 0 trains nothing: None


@needs_tensorboard
@needs_mlflow
def test_mlflow_holds_the_resolved_config_each_rounds_metrics_and_the_adapter(tracked_run, tmp_path):
    config, result = tracked_run
    client, runs = only_run(store_uri(result.run_dir), "tracked")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    params = run.data.params
    assert params["model.name"] == "tiny" and params["federation.rounds"] == "2"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]' and params["tracking.mlflow"] == "true"
    assert params["run.seed"] == str(config.run.seed) and "privacy.noise_multiplier" not in params  # unset
    for key, points in numeric(rows_of(result.run_dir)).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == points, key
    config_text = Path(client.download_artifacts(run.info.run_id, "config.toml", str(tmp_path)))
    assert config_text.read_text() == (result.run_dir / "config.toml").read_text()
    adapter = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
    assert any("lora_B" in name for name, _ in model.named_parameters())
    assert (result.run_dir / "mlartifacts").is_dir()  # the default store keeps artifacts in the run dir


# ---- a decentralized run, run directories that stop and resume, a failing store ---------------------------


@needs_tensorboard
def test_a_decentralized_runs_per_client_losses_reach_tensorboard(tmp_path):
    config = load_config(
        None,
        [*TINY, "federation.topology=decentralized", "tracking.tensorboard=true", f"run.dir={tmp_path}"],
    )
    result = run_decentralized(config)
    rows = rows_of(result.run_dir)
    scalars_read = tensorboard_scalars(result.run_dir / "tensorboard")
    for key, points in numeric(rows).items():
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in points] == scalars_read[key], key
    for client_id, loss in rows[-1]["eval_loss_per_client"].items():  # 4 clients: small enough to keep
        step, value = scalars_read[metric_name(f"eval_loss_per_client/{client_id}")][-1]
        assert step == rows[-1]["round"] and value == pytest.approx(loss, rel=1e-6)


@needs_tensorboard
@needs_mlflow
def test_a_stopped_run_is_marked_killed_and_a_resumed_one_replays_its_rows(
    tracked_run, tmp_path, monkeypatch
):
    _, result = tracked_run
    elsewhere = tmp_path / "working-directory"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's own default puts a database's artifacts in ./mlruns
    folder = tmp_path / "run"
    uri = store_uri(result.run_dir)  # the module run's store: its tables already exist
    config = load_config(
        None,
        [
            *BOTH,
            f"tracking.mlflow_uri='{uri}'",
            "tracking.mlflow_experiment=resumed",
            f"run.dir={folder}",
        ],
    )
    rows = [{"round": 0, "eval_loss": 2.0, "train_loss": None}, {"round": 1, "eval_loss": 1.5}]
    run_dir = RunDir(folder)
    run_dir.create(config)
    run_dir.append_row(rows[0])
    run_dir.close()  # a server stopped (or a run crashed) after round 0
    run_dir = RunDir(folder)
    run_dir.rewrite(config, rows[:1])  # `fedtune server --resume`: the stored rows again
    run_dir.append_row(rows[1])
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    run_dir.finish({}, title="resumed", settings={})
    client, runs = only_run(uri, "resumed")
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    beside_the_store = (result.run_dir / "mlartifacts").resolve().as_uri()
    assert runs[1].info.artifact_uri.startswith(beside_the_store) and not any(elsewhere.iterdir())
    history = [(m.step, m.value) for m in client.get_metric_history(runs[1].info.run_id, "eval_loss")]
    assert sorted(history) == [(0, 2.0), (1, 1.5)]
    assert len(list((folder / "tensorboard").iterdir())) == 1  # the stopped run's events are replaced
    assert tensorboard_scalars(folder / "tensorboard")["eval_loss"] == [(0, 2.0), (1, 1.5)]


@needs_mlflow
def test_an_mlflow_store_that_cannot_be_opened_is_refused_with_the_setting_to_fix(tmp_path):
    config = load_config(
        None, ["tracking.mlflow=true", "tracking.mlflow_uri='nosuch://x'", f"run.dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri: MLflow could not open a run at nosuch://x"):
        RunDir(tmp_path).create(config)


class FailingClient:
    """An MLflow client whose metric writes fail (a tracking server that went away mid-run)."""

    def __init__(self) -> None:
        self.terminated: list[str] = []

    def log_batch(self, run_id, metrics=(), params=()):
        raise OSError("connection refused")

    def set_terminated(self, run_id, status):
        self.terminated.append(status)


@needs_mlflow
def test_a_failed_metric_write_is_raised_at_a_later_round_and_at_the_end_which_marks_the_run_failed():
    from fedtune.tracking.mlflow import MlflowTracker

    tracker = MlflowTracker(FailingClient(), "run-1")  # type: ignore[arg-type]
    tracker.log_row({"round": 0, "eval_loss": 2.0})
    deadline = time.monotonic() + 10
    with pytest.raises(TrackingError, match="to run run-1 failed: connection refused"):  # once written
        while time.monotonic() < deadline:
            tracker.log_row({"round": 1, "eval_loss": 1.0})
            time.sleep(0.01)
    tracker.close()

    client = FailingClient()
    tracker = MlflowTracker(client, "run-2")  # type: ignore[arg-type]
    tracker.log_row({"round": 0, "eval_loss": 2.0})
    with pytest.raises(TrackingError, match="to run run-2 failed"):
        tracker.finish(Path("adapter"))
    assert client.terminated == ["FAILED"]
    tracker.close()  # closing after the failure does nothing more
    assert client.terminated == ["FAILED"]


# ---- a deployed server -------------------------------------------------------------------------------


@needs_tensorboard
@needs_mlflow
def test_a_deployed_server_logs_its_rounds_like_a_simulation(tracked_run, tmp_path):
    from fedtune.deploy.site import run_client
    from tests.deploy_fixtures import SITES, deploy_config, make_certs, make_site_data, running_server

    uri = store_uri(tracked_run[1].run_dir)
    certs, data = make_certs(tmp_path), make_site_data(tmp_path)
    tracking = [*BOTH, f"tracking.mlflow_uri='{uri}'", "tracking.mlflow_experiment=deployed"]
    config = deploy_config(tmp_path, certs, SITES, *tracking)
    errors: list[BaseException] = []

    def site(name: str, target: str) -> None:
        try:
            run_client(target, data[name], certs=certs / "clients" / name, give_up_after_s=30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with running_server(config) as server:
        threads = [threading.Thread(target=site, args=(s, server.target), daemon=True) for s in SITES]
        for t in threads:
            t.start()
        server.thread.join(timeout=120)
        assert "result" in server.result, server.result.get("error")
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    run_dir = tmp_path / "run"
    expected = numeric(rows_of(run_dir))
    assert [s for s, _ in expected["eval_loss"]] == [0, 2] and [s for s, _ in expected["bytes_up"]] == [
        0,
        1,
        2,
    ]
    scalars_read = tensorboard_scalars(run_dir / "tensorboard")
    client, runs = only_run(uri, "deployed")
    assert [r.info.status for r in runs] == ["FINISHED"]
    for key, points in expected.items():
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in points] == scalars_read[key], key
        assert (
            sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)) == points
        )
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
