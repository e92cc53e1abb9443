"""What `fedtune server --resume` may change in a stored run (`deploy.resume`), on configs alone."""

from __future__ import annotations

import pytest

from fedtune.config import load_config
from fedtune.deploy.resume import resumed_config
from fedtune.errors import StateError

BASE = ["model.name=tiny", "federation.rounds=4", "deploy.clients=['a', 'b']"]


def config(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def test_safe_changes_are_taken():
    given = config(
        "federation.rounds=6",
        "deploy.address='0.0.0.0:7000'",
        "deploy.round_timeout_s=30",
        "deploy.poll_interval_s=0.5",
        "deploy.clients=['a', 'b', 'c']",
    )
    resumed = resumed_config(config(), given, rounds_done=4)
    assert resumed.federation.rounds == 6 and resumed.deploy.address == "0.0.0.0:7000"
    assert resumed.deploy.clients == ["a", "b", "c"] and resumed.deploy.round_timeout_s == 30


def test_every_refused_key_is_named_with_both_values_and_why():
    given = config("lora.rank=4", "server.lr=0.5", "deploy.clients=['a']")
    with pytest.raises(StateError) as info:
        resumed_config(config(), given, rounds_done=2)
    message = str(info.value)
    assert "lora.rank" in message and "server.lr" in message and "deploy.clients" in message
    assert "a would leave" not in message and "b would leave" in message  # the allow-list may only grow
    assert "(8 stored, 4 given)" in message


def test_fewer_rounds_than_done_and_dp_changes_are_refused():
    with pytest.raises(StateError, match="3 rounds are already done"):
        resumed_config(config(), config("federation.rounds=2"), rounds_done=3)
    dp = ["privacy.mode='central'", "privacy.noise_multiplier=1.0"]
    with pytest.raises(StateError, match="calibrated for the stored number of rounds"):
        resumed_config(config(*dp), config(*dp, "federation.rounds=8"), rounds_done=1)
    with pytest.raises(StateError, match="assumes the stored population"):
        resumed_config(config(*dp), config(*dp, "deploy.clients=['a', 'b', 'c']"), rounds_done=1)


def test_the_same_config_resumes_unchanged():
    stored = config("privacy.mode='central'", "privacy.target_epsilon=8.0")
    resolved = stored.model_copy(
        update={"privacy": stored.privacy.model_copy(update={"noise_multiplier": 1.3, "delta": 1e-3})}
    )
    assert resumed_config(resolved, stored, rounds_done=1) == resolved  # resolved values are not changes


def test_a_server_that_never_served_leaves_no_state_file(tmp_path):
    import socket

    from fedtune.deploy.server import STATE_FILE, serve
    from tests.deploy_fixtures import deploy_config, make_certs

    certs = make_certs(tmp_path)
    with socket.socket() as taken:  # a port in use: the server cannot bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = deploy_config(tmp_path, certs, ("site-a",), f"deploy.address='127.0.0.1:{port}'")
        with pytest.raises(RuntimeError):
            serve(config)
    assert not (config.run.resolved_dir / STATE_FILE).exists()
    with pytest.raises(StateError, match="no state"):
        serve(config, resume=True)
    assert not (config.run.resolved_dir / STATE_FILE).exists()
