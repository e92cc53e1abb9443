"""Shared set-up for the deployment tests: a CA with client certificates, one data file per site, a config
for the tiny model, and a server running in a thread on a loopback port chosen by the OS."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import Config, load_config
from fedtune.pki import init_ca, issue_client

SITES = ("site-a", "site-b", "site-c")


def make_certs(root: Path, sites: Sequence[str] = SITES) -> Path:
    certs = root / "certs"
    init_ca(certs)
    for site in sites:
        issue_client(certs, site)
    return certs


def make_site_data(root: Path, sites: Sequence[str] = SITES, examples: int = 24) -> dict[str, Path]:
    """One JSONL file per site with distinct, short texts."""
    paths = {}
    for k, site in enumerate(sites):
        path = root / f"{site}.jsonl"
        lines = [
            json.dumps({"text": f"{site} says line {i}: to be or not to be, {k * 7 + i}"})
            for i in range(examples)
        ]
        path.write_text("\n".join(lines) + "\n")
        paths[site] = path
    return paths


def deploy_config(root: Path, certs: Path, sites: Sequence[str] = SITES, *overrides: str) -> Config:
    return load_config(
        None,
        [
            "model.name=tiny",
            f"run.dir='{root / 'run'}'",
            "run.threads=1",
            "federation.rounds=2",
            f"federation.clients_per_round={len(sites)}",
            "federation.local_steps=2",
            "lora.target_modules=['q_proj', 'v_proj']",
            f"deploy.clients={json.dumps(list(sites))}",
            "deploy.address='127.0.0.1:0'",
            f"deploy.certs='{certs / 'server'}'",
            "deploy.poll_interval_s=0.05",
            "deploy.round_timeout_s=60",
            "deploy.wait_for_clients_s=60",
            *overrides,
        ],
    )


@dataclass
class RunningServer:
    port: int
    thread: threading.Thread
    stop: threading.Event
    result: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics rows, as metrics.jsonl has them

    def trained(self) -> list[dict[str, Any]]:
        """The rows of training rounds (round 0 is the evaluation before training)."""
        return [r for r in self.rows if r["round"] > 0]

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"


@contextmanager
def running_server(
    config: Config, *, insecure: bool = False, resume: bool = False, **serve_options: Any
) -> Iterator[RunningServer]:
    """`fedtune.deploy.server.serve` in a thread; stopped (and joined) on exit. `rows` collects each
    round's metrics row (round 0, the evaluation before training, first)."""
    from fedtune.deploy.server import serve

    port: list[int] = []
    stop = threading.Event()
    holder: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def target() -> None:
        try:
            holder["result"] = serve(
                config,
                resume=resume,
                insecure=insecure,
                stop=stop,
                bound_port=port,
                on_round=lambda result: rows.append(result.to_row()),
                **serve_options,
            )
        except BaseException as exc:  # surfaced by the test through `result["error"]`
            holder["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not port and "error" not in holder and time.monotonic() < deadline:
        time.sleep(0.02)
    if "error" in holder:
        raise holder["error"]
    running = RunningServer(port[0], thread, stop, holder, rows)
    try:
        yield running
    finally:
        stop.set()
        thread.join(timeout=30)


def evaluate_then_vanish(target: str, site_certs: Path, data: Path) -> None:
    """A real site (its own participant) that evaluates whatever it is asked to until it is handed a
    secure training task: it sends its keys and its shares, then nothing more (it crashed mid-round)."""
    from fedtune.deploy.site import build_site
    from fedtune.pki import common_name, load_identity
    from fedtune.round.messages import EvalRequest, SecureTrainRequest
    from fedtune.secagg import Stage
    from fedtune.transport import convert
    from fedtune.transport import secagg_wire as sw
    from fedtune.transport.channel import Stub, open_channel
    from fedtune.transport.site_driver import RoundCalls, get_task, join

    client_id = common_name(load_identity(site_certs).cert_pem)
    stub = Stub(open_channel(target, site_certs))
    reply = join(stub, client_id, 0)
    from fedtune.config import load_config_text

    site = build_site(load_config_text(reply.config_toml), data, "text", client_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = get_task(stub, reply.session, site.adapter_numel)
        if not isinstance(found, tuple):
            time.sleep(0.05)
            continue
        task, flat, control = found
        request = convert.request_from_pb(task, flat, client_id, control)
        calls = RoundCalls(stub, reply.session, task, site.chunk_bytes)
        if isinstance(request, EvalRequest):
            calls.send(site.participant.respond(request))  # type: ignore[arg-type]
            continue
        assert isinstance(request, SecureTrainRequest)
        calls.call(advertise=sw.advertise_to_pb(site.participant.respond(request)))  # type: ignore[arg-type]
        keys = calls.poll(Stage.SHARE_KEYS)
        assert keys is not None, calls.left_out
        slot = request.member.slot
        neighbours = sw.neighbour_keys_from_pb(keys.neighbour_keys, request.task.round_num, slot)
        calls.call(share=sw.share_keys_to_pb(site.participant.respond(neighbours)))  # type: ignore[arg-type]
        return
    raise AssertionError("the vanishing site never got its secure task")
