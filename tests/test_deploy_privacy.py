"""Client-level DP in a deployment: the accountant's state is part of the server's checkpoint.

A central-DP run is stopped after its first round and resumed from SQLite; the epsilon it reports after
round 2 equals dp_accounting's for two rounds, computed independently, so nothing was forgotten (a fresh
accountant would report one round) or counted twice.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fedtune.deploy.site import run_client
from fedtune.rundir import RunDir
from fedtune.store import Store
from tests.deploy_fixtures import deploy_config, make_certs, make_site_data, running_server
from tests.test_privacy_accountant import hand_built

SITES4 = ("site-a", "site-b", "site-c", "site-d")


def test_dp_accountant_survives_a_server_restart(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, SITES4)
    data = make_site_data(tmp_path, SITES4)
    z, delta = 1.5, 1e-5
    config = deploy_config(
        tmp_path,
        certs,
        SITES4,
        "federation.clients_per_round=2",
        "privacy.mode='central'",
        f"privacy.noise_multiplier={z}",
        f"privacy.delta={delta}",
        "privacy.clip_l2_norm=0.5",
    )
    results: dict[str, object] = {}
    port: list[int] = []

    def site(name: str) -> None:
        try:
            results[name] = run_client(
                f"localhost:{port[0]}", data[name], certs=certs / "clients" / name, give_up_after_s=60
            )
        except Exception as exc:  # reported by the assertion below
            results[name] = exc

    clients = [threading.Thread(target=site, args=(name,), daemon=True) for name in SITES4]
    with running_server(config) as server:  # binds a port of the OS's choosing
        port.append(server.port)
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 180
        while not server.trained() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.trained(), "round 1 never finished"
    # the server is stopped (mid-round 2 or before it): the state file holds round 1 with its accountant
    with Store(config.run.resolved_dir / "state.db") as store:
        checkpoint = store.latest_checkpoint()
        assert checkpoint is not None and checkpoint.round_num == 1
        assert checkpoint.dp_state is not None
        layout = (checkpoint.extra or {})["layout"]  # what a resume checks the model against
        assert layout and all("lora_" in name for name, _shape in layout)
        assert json.loads(json.dumps(checkpoint.dp_state))["accountant"]["history"]  # one round accounted

    # the same port again: the clients retry it while the server is away
    resumed = config.model_copy(
        update={"deploy": config.deploy.model_copy(update={"address": f"127.0.0.1:{port[0]}"})}
    )
    with running_server(resumed, resume=True) as server:
        server.thread.join(timeout=240)
        assert "error" not in server.result, server.result.get("error")
        assert "result" in server.result
    for thread in clients:
        thread.join(timeout=60)
    assert all(not isinstance(r, Exception) for r in results.values()), results

    rows = RunDir(config.run.resolved_dir).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["epsilon"] == 0.0
    rows = rows[1:]
    assert "client_ids" not in rows[0]  # who took part is not published under DP
    for row in rows:
        expected = hand_built("rdp", "fixed", z, row["round"], n=len(SITES4), k=2)
        assert row["epsilon"] == pytest.approx(expected, rel=0.01)
    assert rows[1]["epsilon"] > rows[0]["epsilon"] > 0
