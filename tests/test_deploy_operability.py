"""A deployment its operators can read: refused sites told why at once, the coordinator seeing every
refusal with its reason, and `--resume` that extends a run or names what it cannot change.

Real processes on loopback with real certificates, as a site admin and a coordinator would run them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedtune.pki import init_ca, issue_client
from fedtune.rundir import RunDir
from tests.deploy_fixtures import SITES
from tests.test_deploy_processes import (
    FEDTUNE,
    _adapter,
    bound_port,
    deployment,
    env,
    logs,
    start_all,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.slow
ANSWER_WITHIN_S = 45  # process start (torch imports) on a loaded 2-core machine, then one handshake


def site_process(port: int, data: Path, log: Path, *auth: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*FEDTUNE, "client", "--server", f"localhost:{port}", "--data", str(data), *auth],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env(),
    )


def refused_sites(tmp: Path, certs: Path) -> dict[str, tuple[str, ...]]:
    """The ways a site gets turned away: an expired certificate of our CA, a folder from another CA, no
    TLS at all, and a certificate of our CA for a site not on the allow-list."""
    expired = tmp / "expired"
    shutil.copytree(certs, expired)
    issue_client(expired, "site-a", now=datetime.now(UTC) - timedelta(days=10), days=1, force=True)
    other = tmp / "other"
    init_ca(other)
    issue_client(other, "site-b")
    issue_client(certs, "site-z")
    return {
        "expired": ("--certs", str(expired / "clients" / "site-a")),
        "other_ca": ("--certs", str(other / "clients" / "site-b")),
        "plaintext": ("--unsafe-insecure", "--client-id", "site-c"),
        "not_allowed": ("--certs", str(certs / "clients" / "site-z")),
    }


EXPECTED_AT_SITE = {
    "expired": "expired on",
    "other_ca": "is not trusted by this site",
    "plaintext": "requires mutual TLS",
    "not_allowed": "not on this run's allow-list",
}


def test_refused_sites_are_told_why_at_once_and_the_coordinator_sees_each(tmp_path: Path) -> None:
    with deployment(tmp_path, "deploy.wait_for_clients_s=300") as ctx:
        server = start_server(ctx["config"], tmp_path / "server.log")
        ctx["procs"].append(server)
        port = bound_port(tmp_path / "server.log", server)
        started = time.monotonic()
        sites = {
            name: site_process(port, ctx["data"][SITES[0]], tmp_path / f"{name}.log", *auth)
            for name, auth in refused_sites(tmp_path, ctx["certs"]).items()
        }
        ctx["procs"].extend(sites.values())
        for name, proc in sites.items():
            assert proc.wait(timeout=ANSWER_WITHIN_S) == 2, logs(tmp_path)
            out = (tmp_path / f"{name}.log").read_text()
            assert EXPECTED_AT_SITE[name] in out, out
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in out, out  # one line says what is wrong
            assert "Handshake failed" not in out and ".cc:" not in out, out  # and no gRPC log lines
        assert time.monotonic() - started < ANSWER_WITHIN_S  # at once, not after --give-up-after (600 s)

        def recorded() -> str:
            status = subprocess.run(
                [*FEDTUNE, "status", str(ctx["run_dir"])], capture_output=True, text=True, env=env()
            )
            return status.stdout

        reasons = {
            "the client's certificate has expired",
            "does not trust this server's certificate",
            "presented no certificate",  # the plaintext site's probe: TLS without a certificate
            "not on this run's allow-list",
        }
        wait_for(lambda: all(r in recorded() for r in reasons), 30, "the refusals in `fedtune status`", 0.5)
        shown = recorded()
        assert "tls_handshake" in shown and "not_allowed" in shown, shown
        assert "127.0.0.1:" in shown  # the peer address of a refused handshake


def test_resume_extends_a_finished_run_to_the_adapter_of_a_longer_one(tmp_path: Path) -> None:
    with deployment(tmp_path / "long", "federation.rounds=3") as ctx:
        assert start_all(ctx, tmp_path / "long").wait(timeout=240) == 0, logs(tmp_path / "long")
    expected = _adapter(ctx["run_dir"])

    short = tmp_path / "short"
    with deployment(short, "federation.rounds=1") as ctx:
        assert start_all(ctx, short).wait(timeout=240) == 0, logs(short)
        for proc in ctx["procs"][1:]:
            proc.wait(timeout=60)  # the sites heard the run is done
        changed = subprocess.run(
            [*FEDTUNE, "server", str(ctx["config"]), "--resume", "--set", "lora.rank=4"],
            capture_output=True,
            text=True,
            env=env(),
            timeout=120,
        )
        assert changed.returncode == 2 and "lora.rank" in changed.stderr, changed.stderr
        ctx["procs"].clear()
        extended = start_all(ctx, short, "--resume", "--set", "federation.rounds=3", log="resumed.log")
        assert extended.wait(timeout=240) == 0, logs(short)
    assert "resuming after round 1" in (short / "resumed.log").read_text()
    assert [r["round"] for r in RunDir(ctx["run_dir"]).read_metrics()] == [0, 1, 2, 3]
    got = _adapter(ctx["run_dir"])
    for name, tensor in expected.items():
        assert (got[name] == tensor).all(), name
