"""`fedtune server --dashboard PORT`: the coordinator serves the live page of its own run, read from its
run directory while the rounds go on (real processes: the server and three sites)."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path

import pytest

from tests.test_deploy_processes import deployment, logs, start_all

pytestmark = pytest.mark.slow
DASHBOARD = re.compile(r"dashboard of .*: http://127\.0\.0\.1:(\d+)/")


def _summary(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/api/run")
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def test_the_server_serves_its_runs_dashboard_while_it_runs(tmp_path: Path) -> None:
    with deployment(tmp_path) as ctx:
        server = start_all(ctx, tmp_path, "--dashboard", "0")
        found = DASHBOARD.findall((tmp_path / "server.log").read_text())
        assert found, logs(tmp_path)  # said before the gRPC port, which start_all waited for
        port = int(found[0])
        seen: list[dict] = []
        while server.poll() is None:
            try:
                seen.append(_summary(port))
            except (ConnectionError, OSError):
                break  # the server is finishing: its dashboard went with it
            time.sleep(0.2)
        assert server.wait(timeout=240) == 0, logs(tmp_path)
    assert seen and all(s["kind"] == "deployment" for s in seen)
    rounds_seen = sorted({s["progress"]["rounds_done"] for s in seen if s["rounds"]})
    assert rounds_seen and rounds_seen[-1] >= 1, rounds_seen  # the page followed the rounds as they ended
    assert any(s["deployment"]["open_round"] is not None for s in seen)  # and the round in flight
