"""A real deployment on loopback: `fedtune server` and `fedtune client` processes with mutual TLS and SQLite.

Each test starts real processes through the CLI, as a site admin would, and kills them with SIGKILL where a
crash is the point: a client killed mid-round leaves a straggler and the round completes without it; a
server killed mid-round and restarted with --resume ends with the same adapter as an uninterrupted run.
The server binds port 0 and the test reads the port it got from its log; a restarted server binds the
port its killed predecessor had, which the clients keep retrying.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtune.config import to_toml
from fedtune.rundir import RunDir
from tests.deploy_fixtures import SITES, deploy_config, make_certs, make_site_data

FEDTUNE = [sys.executable, "-m", "fedtune"]


def env() -> dict[str, str]:
    """The test's environment (with its private model cache) for the child processes."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}


SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


def bound_port(log: Path, server: subprocess.Popen, timeout_s: float = 120) -> int:
    """The port the server process bound, from its log (it binds port 0)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        found = SERVING.findall(log.read_text()) if log.exists() else []
        if found:
            return int(found[-1])
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("the server never said which port it serves on")


def start_server(config_file: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*FEDTUNE, "server", str(config_file), *extra],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env=env(),
    )


def start_client(port: int, data: Path, certs: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *FEDTUNE,
            "client",
            "--server",
            f"localhost:{port}",
            "--data",
            str(data),
            "--certs",
            str(certs),
            "--give-up-after",
            "30",
        ],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env=env(),
    )


@contextmanager
def deployment(tmp: Path, *overrides: str, run: str = "run") -> Iterator[dict]:
    """Files for a 3-site run; every process started through it is killed on exit."""
    certs = tmp / "certs"
    if not certs.exists():
        make_certs(tmp)
    data = make_site_data(tmp)
    config = deploy_config(
        tmp, certs, SITES, "deploy.address='127.0.0.1:0'", f"run.dir='{tmp / run}'", *overrides
    )
    config_file = tmp / f"{run}.toml"
    config_file.write_text(to_toml(config))
    procs: list[subprocess.Popen] = []
    ctx = {
        "certs": certs,
        "data": data,
        "config": config_file,
        "run_dir": tmp / run,
        "procs": procs,
    }
    try:
        yield ctx
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def start_all(ctx: dict, tmp: Path, *server_args: str, log: str = "server.log") -> subprocess.Popen:
    server = start_server(ctx["config"], tmp / log, *server_args)
    ctx["procs"].append(server)
    ctx["port"] = bound_port(tmp / log, server)
    for site in SITES:
        ctx["procs"].append(
            start_client(ctx["port"], ctx["data"][site], ctx["certs"] / "clients" / site, tmp / f"{site}.log")
        )
    return server


def participants(run_dir: Path, round_num: int) -> dict[str, str]:
    """Participant statuses of a round, read from the server's SQLite file while it runs."""
    db = run_dir / "state.db"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT client_id, status FROM participants WHERE round = ?", (round_num,))
            return dict(rows.fetchall())
    except sqlite3.Error:
        return {}


def round_status(run_dir: Path, round_num: int) -> str | None:
    db = run_dir / "state.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT status FROM rounds WHERE round = ?", (round_num,)).fetchone()
            return None if row is None else row[0]
    except sqlite3.Error:
        return None


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.005) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp.glob("*.log")))


def test_server_and_client_processes_complete_rounds_with_mutual_tls(tmp_path: Path) -> None:
    with deployment(tmp_path) as ctx:
        server = start_all(ctx, tmp_path)
        assert server.wait(timeout=240) == 0, logs(tmp_path)
        for client in ctx["procs"][1:]:
            assert client.wait(timeout=60) == 0, logs(tmp_path)
    rows = RunDir(ctx["run_dir"]).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval_clients"] == 3 and rows[-1]["eval_clients"] == 3  # evaluated before and after
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    for row in rows[1:]:
        assert row["clients"] == 3 and sorted(row["client_ids"]) == sorted(SITES)
        assert row["stragglers"] == [] and row["bytes_up"] > 0
    assert rows[1]["eval_loss"] is None  # eval.every = 2: round 1 is not evaluated, round 2 (the last) is
    assert (ctx["run_dir"] / "adapter" / "adapter_model.safetensors").is_file()
    assert "mutual TLS" in (tmp_path / "server.log").read_text()
    for site in SITES:
        assert "the run is complete" in (tmp_path / f"{site}.log").read_text()
    status = subprocess.run(
        [*FEDTUNE, "status", str(ctx["run_dir"])], capture_output=True, text=True, env=env(), timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert re.search(r"round\s+2\s+done", status.stdout), status.stdout


def test_a_client_killed_mid_round_does_not_fail_the_round(tmp_path: Path) -> None:
    victim = SITES[2]
    overrides = (
        "federation.rounds=1",
        "federation.local_steps=30",
        "federation.min_clients=2",
        "deploy.round_timeout_s=30",
        "deploy.eval_timeout_s=30",  # the victim went silent: it is not waited for
    )
    with deployment(tmp_path, *overrides) as ctx:
        server = start_all(ctx, tmp_path)
        victim_proc = ctx["procs"][1 + SITES.index(victim)]
        wait_for(lambda: participants(ctx["run_dir"], 1).get(victim) == "sent", 120, "the victim's task")
        victim_proc.send_signal(signal.SIGKILL)
        assert server.wait(timeout=120) == 0, logs(tmp_path)
    _, row = RunDir(ctx["run_dir"]).read_metrics()
    assert row["clients"] == 2, row
    assert row["stragglers"] == [victim]
    assert row["round_failed"] is None
    assert row["eval_clients"] == 2  # the victim is gone: the others evaluate the new adapter
    assert participants(ctx["run_dir"], 1)[victim] == "straggler"


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "kill_when,extra",
    [("submitted", ()), ("submitted", ("server.control_variates='scaffold'",))],
    ids=["fedavg", "scaffold"],
)
def test_server_killed_mid_round_resumes_to_the_same_adapter(
    tmp_path: Path, kill_when: str, extra: tuple[str, ...]
) -> None:
    """SCAFFOLD: the server control comes back from the checkpoint, and each site repeats the round in
    flight from the state it kept before it (its control and residual)."""
    overrides = (
        "federation.rounds=4",
        "server.optimizer='adam'",
        "server.lr=0.01",
        "compression.method='quantize'",
        "compression.bits=8",
        *extra,
    )
    with deployment(tmp_path / "a", *overrides) as ctx:
        server = start_all(ctx, tmp_path / "a")
        assert server.wait(timeout=240) == 0, logs(tmp_path / "a")
    expected = _adapter(ctx["run_dir"])

    b = tmp_path / "b"
    with deployment(b, *overrides) as ctx:
        server = start_all(ctx, b)
        run_dir = ctx["run_dir"]

        def mid_round() -> bool:  # a round after the first is open and at least one update is in
            return any(
                round_status(run_dir, r) == "open" and "submitted" in participants(run_dir, r).values()
                for r in (2, 3, 4)
            )

        wait_for(mid_round, 240, "an update inside an open round")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        killed_in = max(r for r in (2, 3, 4) if round_status(run_dir, r) is not None)
        assert round_status(run_dir, killed_in) == "open"
        port = ctx["port"]  # the clients retry it: the new server binds it again
        resumed = start_server(
            ctx["config"], b / "server.log", "--resume", "--set", f"deploy.address='127.0.0.1:{port}'"
        )
        ctx["procs"].append(resumed)
        assert resumed.wait(timeout=240) == 0, logs(b)
        assert f"resuming after round {killed_in - 1}" in (b / "server.log").read_text()
    rows = RunDir(run_dir).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    got = _adapter(run_dir)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (got[name] == tensor).all(), name
