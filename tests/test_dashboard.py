"""The dashboard without a browser: the incremental reader, the typed summary, the read-only state file,
and the HTTP server's rules (GET only, fixed paths, the token, loopback hosts)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.dashboard import TOKEN_HEADER, DashboardServer, RunWatcher
from fedtune.dashboard.server import is_loopback, required_token, token_matches
from fedtune.dashboard.summary import summarize
from fedtune.dashboard.watch import MetricsTail, read_deployment
from fedtune.decentral.results import DecentralRound, PeerEval
from fedtune.errors import ConfigError, StateError
from fedtune.store import Store
from tests.dashboard_fixtures import round_result, write_rows

# The incremental reader.


def test_tail_reads_appended_lines_and_waits_for_a_half_written_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # no file yet
    path.write_text('{"round": 0}\n{"round": 1')
    assert tail.read() == [{"round": 0}]
    with path.open("a") as f:
        f.write(', "x": 1}\n')
    assert tail.read() == [{"round": 0}, {"round": 1, "x": 1}]
    with path.open("a") as f:
        f.write("not json\n\n")
    assert tail.read() == [{"round": 0}, {"round": 1, "x": 1}] and tail.bad_lines == 1


def test_tail_starts_over_when_the_file_is_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    path.write_text('{"round": 0, "run": "old"}\n{"round": 1, "run": "old"}\n')
    assert len(tail.read()) == 2
    path.write_text('{"round": 0, "run": "new-run"}\n{"round": 1, "run": "new-run"}\n{"round": 2}\n')
    assert [r.get("run") for r in tail.read()] == ["new-run", "new-run", None]  # same size or larger
    path.write_text("")
    assert tail.read() == []


# The typed summary.


def test_summary_of_a_star_run_names_its_panels_and_clients(tmp_path):
    rows = [
        round_result(0).to_row(),
        round_result(1, stragglers=("c",), secagg=(3, 3, 3, 3), epsilon=0.5).to_row(),
        round_result(2, ids=("a",), failures={"b": "NaN loss"}, secagg=(3, 2, 1, 1), epsilon=0.8).to_row(),
    ]
    s = summarize(
        run_dir="r", rows=rows, settings=None, deployment=None, finished=False, last_update_age_s=1.0, now=5.0
    )
    assert [p.round_num for p in s.rounds] == [0, 1, 2]
    assert s.progress.state == "running" and s.progress.rounds_done == 2
    assert s.progress.seconds_per_round == 1.5
    assert {"loss", "privacy", "secagg", "clients", "refusals"} <= set(s.panels)
    assert "attack" not in s.panels and "decentral" not in s.panels and "open_round" not in s.panels
    by_id = {c.client_id: c for c in s.clients}
    assert (by_id["a"].aggregated, by_id["b"].aggregated, by_id["b"].failed) == (2, 1, 1)
    assert by_id["b"].last_failure == "NaN loss" and by_id["c"].straggled == 1
    assert s.refused_totals == {"stale_round": 1}
    assert s.rounds[2].secagg_survivors == (3, 2, 1, 1) and s.rounds[2].secagg_abort == "too few"
    assert s.rounds[1].bytes_down == 3 * 2**20 + 1000  # training and evaluation downloads


def test_summary_under_client_level_dp_says_who_took_part_is_not_published():
    rows = [round_result(0).to_row(), round_result(1, ids=None, stragglers=("c",), epsilon=0.3).to_row()]
    assert "client_ids" not in rows[1]
    s = summarize(
        run_dir="r", rows=rows, settings=None, deployment=None, finished=True, last_update_age_s=None, now=0
    )
    assert s.progress.state == "finished"
    assert [(c.client_id, c.aggregated, c.straggled) for c in s.clients] == [("c", None, 1)]


def test_summary_reads_attack_and_decentralized_rows():
    attack = [round_result(0).to_row(), round_result(1, attack=True).to_row()]
    s = summarize(
        run_dir="r", rows=attack, settings=None, deployment=None, finished=False, last_update_age_s=0, now=0
    )
    assert "attack" in s.panels and s.rounds[1].backdoor_success == 0.25
    peer = PeerEval({"a": 2.0, "b": 3.0}, 2.5, 0.5, 0.1)
    row = DecentralRound(1, 2, {}, 2.9, 3, 1, peer, 4096, {}, 1.0, 0.8).to_row()
    s = summarize(
        run_dir="r", rows=[row], settings=None, deployment=None, finished=False, last_update_age_s=0, now=0
    )
    point = s.rounds[0]
    assert "decentral" in s.panels and point.acceptance_rate == 0.75 and point.eval_loss_std == 0.5
    assert point.selected is None and point.aggregated == 2


def test_damaged_rows_are_skipped_and_wrong_types_read_as_missing():
    rows = [{"round": "one"}, [1, 2], {"round": 1, "train_loss": "high", "clients": True, "seconds": 2.0}]
    s = summarize(
        run_dir="r", rows=rows, settings=None, deployment=None, finished=False, last_update_age_s=0, now=0
    )
    assert [p.round_num for p in s.rounds] == [1]
    assert s.rounds[0].train_loss is None and s.rounds[0].aggregated is None
    assert any("2 line(s)" in note for note in s.notes)


def test_watcher_reads_the_settings_and_sees_a_finished_run(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[run]\nname = "pilot"\n[federation]\nrounds = 4\n[privacy]\nmode = "central"\ntarget_epsilon = 2.0\n'
    )
    write_rows(tmp_path / "metrics.jsonl", [round_result(0).to_row(), round_result(1, epsilon=0.5).to_row()])
    watcher = RunWatcher(tmp_path, clock=lambda: time.time() + 10)
    s = watcher.summary()
    assert s.settings is not None and (s.settings.name, s.settings.rounds) == ("pilot", 4)
    assert s.settings.target_epsilon == 2.0 and "privacy" in s.panels
    assert s.progress.state == "running" and s.progress.eta_s == pytest.approx(3 * 1.5)
    assert s.progress.last_update_age_s is not None and s.progress.last_update_age_s >= 9
    (tmp_path / "report.md").write_text("# done")
    assert watcher.summary().progress.state == "finished"


# A deployment's state file, read-only.


def test_deployment_state_shows_the_open_round_and_refusals_without_blocking_the_server(tmp_path):
    path = tmp_path / "state.db"
    with Store(path) as server_store:
        server_store.start_run("")
        server_store.open_round(1, ["a", "b", "c"])
        server_store.set_participant(1, "a", "submitted")
        server_store.set_participant(1, "c", "refused", "bad nonce")
        server_store.record_event("refused_bad_nonce", "nonce of round 0", round_num=1, client_id="c")
        server_store.record_event("joined", "hello", client_id="a")
        with Store(path, read_only=True) as reader:
            reader.rounds()  # a reader holds the file open ...
            server_store.set_participant(1, "b", "sent")  # ... and the server writes on, at once
            with pytest.raises(StateError, match="read-only"):
                reader.record_event("refused_x", "y")
        state = read_deployment(path)
    assert state.open_round is not None and state.open_round.round_num == 1
    assert state.open_round.submitted == 1 and state.open_round.waiting == ("b",)
    assert [(p.client_id, p.status) for p in state.open_round.participants] == [
        ("a", "submitted"),
        ("b", "sent"),
        ("c", "refused"),
    ]
    assert state.refused_totals == {"refused_bad_nonce": 1}
    assert [(e.client_id, e.detail) for e in state.latest_refusals] == [("c", "nonce of round 0")]
    s = RunWatcher(tmp_path).summary()
    assert s.kind == "deployment" and "open_round" in s.panels and s.progress.state == "running"


def test_a_file_that_is_not_state_is_a_note_not_an_error(tmp_path):
    (tmp_path / "state.db").write_bytes(b"not sqlite at all" * 100)
    s = RunWatcher(tmp_path).summary()
    assert s.kind == "simulation" and any("state.db could not be read" in n for n in s.notes)


# The HTTP server.


@pytest.fixture
def run_dir(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [round_result(0).to_row(), round_result(1).to_row()])
    return tmp_path


def request(
    server: DashboardServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def test_the_page_its_assets_and_the_run(run_dir):
    with DashboardServer(run_dir, port=0) as server:
        assert server.port != 0 and server.token is None
        status, body, response = request(server, "GET", "/")
        assert status == 200 and b"/static/dashboard.js" in body
        assert "script-src 'self'" in response.getheader("Content-Security-Policy")
        status, body, response = request(server, "GET", "/static/uPlot.iife.min.js")
        assert status == 200 and response.getheader("Content-Type").startswith("text/javascript")
        status, body, _ = request(server, "GET", "/api/run")
        summary = json.loads(body)
        assert status == 200 and [r["round_num"] for r in summary["rounds"]] == [0, 1]
        status, body, _ = request(server, "HEAD", "/api/run")
        assert status == 200 and body == b""


@pytest.mark.parametrize(
    "path",
    ["/static/../server.py", "/static/", "/static/watch.py", "/api", "/api/run/x", "/etc/passwd", "/%2e%2e/"],
)
def test_other_paths_are_not_found(run_dir, path):
    with DashboardServer(run_dir, port=0) as server:
        status, body, _ = request(server, "GET", path)
        assert status == 404 and "error" in json.loads(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_nothing_can_be_written(run_dir, method):
    with DashboardServer(run_dir, port=0) as server:
        status, _, response = request(server, method, "/api/run")
        assert status == 405 and response.getheader("Allow") == "GET, HEAD"


def test_the_token_is_required_and_compared(run_dir):
    with DashboardServer(run_dir, port=0, token="open-sesame") as server:
        assert request(server, "GET", "/api/run")[0] == 401
        assert request(server, "GET", "/api/run", {TOKEN_HEADER: "open-sesam"})[0] == 401
        assert request(server, "GET", "/api/run", {TOKEN_HEADER: "open-sesame"})[0] == 200
        assert request(server, "GET", "/")[0] == 200  # the page itself holds no data: it asks for the token


def test_beyond_loopback_a_token_is_made_and_required():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host) and required_token(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "fl.example.org"):
        token = required_token(host, None)
        assert not is_loopback(host) and token is not None and len(token) >= 32
        assert required_token(host, None) != token
    assert required_token("0.0.0.0", "mine") == "mine"
    with pytest.raises(ConfigError, match="empty"):
        required_token("0.0.0.0", "")
    assert token_matches(None, None) and token_matches("t", "t")
    assert not token_matches("t", None) and not token_matches("t", "T") and not token_matches("t", "tt")


def test_loopback_without_a_token_refuses_a_foreign_host_name(run_dir):
    with DashboardServer(run_dir, port=0) as server:
        assert request(server, "GET", "/api/run", {"Host": "attacker.example:8050"})[0] == 421
        assert request(server, "GET", "/api/run", {"Host": f"localhost:{server.port}"})[0] == 200


def test_bad_requests_never_stop_the_server(run_dir, monkeypatch):
    with DashboardServer(run_dir, port=0) as server:
        for garbage in (
            b"\x00\xff garbage\r\n\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
            b"BREW / HTTP/1.1\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(garbage)
                sock.recv(1024)
        watcher = server._httpd.watcher

        def broken() -> None:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(watcher, "summary", broken)
        status, body, _ = request(server, "GET", "/api/run")
        assert status == 500 and b"disk on fire" not in body
        monkeypatch.undo()
        assert request(server, "GET", "/api/run")[0] == 200


def test_a_port_in_use_is_one_clear_error(run_dir):
    with DashboardServer(run_dir, port=0) as server, pytest.raises(ConfigError, match="another --port"):
        DashboardServer(run_dir, port=server.port)


def test_the_command_serves_until_stopped(run_dir):
    command = [sys.executable, "-m", "fedtune", "dashboard", str(run_dir), "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**_env(), "COLUMNS": "300"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(": ", 1)[1].strip()
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/api/run")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = subprocess.run(
        [sys.executable, "-m", "fedtune", "dashboard", str(run_dir / "nope")],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert missing.returncode == 2 and "no run directory" in missing.stderr


def _env() -> dict[str, str]:
    import os

    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
