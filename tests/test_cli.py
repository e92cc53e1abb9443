"""The CLI as a user meets it: bad input stops before training with one line and no traceback."""

import json
import subprocess
import sys

import pytest


def fedtune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedtune", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "federation.rounds=0"], "federation.rounds = 0"),
        (["--set", "lora.rank=-1"], "lora.rank = -1"),
        (
            ["--set", "model.name=/no/such/model"],
            "model.name = '/no/such/model': no such directory",
        ),
        (["--set", "model.name=tiny", "--set", "data.min_examples=100000"], "data.min_examples"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message, tmp_path):
    proc = fedtune("run", *args, "--set", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any training


def test_data_file_without_the_named_field(tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"note {i}", "site": i % 2}) for i in range(40)))
    proc = fedtune(
        "run",
        "--set",
        "model.name=tiny",
        "--set",
        f"data.source={data}",
        "--set",
        "data.client_field=site",
        "--set",
        f"run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    assert "text" in proc.stderr and "data.text_field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_command_prints_resolved_toml():
    proc = fedtune("config", "--set", "federation.rounds=2")
    assert proc.returncode == 0
    assert "rounds = 2" in proc.stdout and "[lora]" in proc.stdout


def test_smoke_run_and_generate(tmp_path):
    run_dir = tmp_path / "smoke"
    proc = fedtune(
        "run",
        "--set",
        "model.name=tiny",
        "--set",
        "federation.rounds=1",
        "--set",
        "federation.num_clients=2",
        "--set",
        "federation.clients_per_round=2",
        "--set",
        "federation.local_steps=2",
        "--set",
        f"run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval perplexity" in proc.stdout
    gen = fedtune("generate", "--adapter", str(run_dir / "adapter"), "--max-new-tokens", "5", "Hello")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Hello")


@pytest.mark.slow
def test_compare_prints_its_verdict_and_writes_the_folder(tmp_path):
    sets = [
        "model.name=tiny",
        "federation.rounds=1",
        "federation.num_clients=2",
        "federation.clients_per_round=1",
        "federation.local_steps=2",
        "eval.max_examples_per_client=2",
        f"run.dir={tmp_path / 'cmp'}",
    ]
    proc = fedtune("compare", "--seeds", "1", *(arg for s in sets for arg in ("--set", s)))
    assert proc.returncode == 0, proc.stderr
    assert "Federated beats local-only for" in proc.stdout
    written = json.loads((tmp_path / "cmp" / "compare" / "compare.json").read_text())
    assert written["arms"] == ["base", "local", "centralized", "federated"]
