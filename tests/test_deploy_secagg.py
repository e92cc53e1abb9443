"""Secure aggregation over the network: SecAgg+ between a real gRPC server and clients with mutual TLS.

The server never sees an update, yet the adapter it ends with equals the plaintext deployment's within the
fixed-point step; a client that vanishes after sharing its keys (a stage-2 dropout) is recovered by the
protocol and the round completes without it; an update in the clear is refused in a secure round.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedtune.deploy.site import run_client
from fedtune.round.messages import EvalReport
from fedtune.transport import fedtune_v2_pb2 as pb
from fedtune.transport.channel import Stub, open_channel
from fedtune.transport.site_driver import RoundCalls, get_task
from fedtune.transport.wire import PROTOCOL_VERSION
from tests.deploy_fixtures import (
    deploy_config,
    evaluate_then_vanish,
    make_certs,
    make_site_data,
    running_server,
)

SITES4 = ("site-a", "site-b", "site-c", "site-d")


def _run(
    tmp: Path, name: str, sites: tuple[str, ...], *overrides: str, vanish: str | None = None
) -> list[dict]:
    """A deployed run with a thread per site; `vanish` shares its keys in round 1, then goes silent."""
    certs = tmp / "certs"
    if not certs.exists():
        make_certs(tmp, SITES4)
    data = make_site_data(tmp, SITES4)
    config = deploy_config(tmp, certs, sites, f"run.dir='{tmp / name}'", *overrides)
    errors: list[BaseException] = []

    def site(sid: str, target: str) -> None:
        try:
            run_client(target, data[sid], certs=certs / "clients" / sid, give_up_after_s=30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with running_server(config) as server:
        threads = [
            threading.Thread(target=site, args=(s, server.target), daemon=True) for s in sites if s != vanish
        ]
        for t in threads:
            t.start()
        if vanish is not None:
            evaluate_then_vanish(server.target, certs / "clients" / vanish, data[vanish])
        server.thread.join(timeout=240)
        assert "result" in server.result, server.result.get("error")
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    return server.trained()


def test_secure_deployment_matches_the_plaintext_one_within_the_encoding_step(tmp_path: Path) -> None:
    # one round: after it, each client's training starts from a slightly different adapter
    common = ("federation.rounds=1", "secure_aggregation.bits=16", "secure_aggregation.clip_range=0.1")
    plain = _run(tmp_path, "plain", SITES4, *common)
    secure = _run(tmp_path, "secure", SITES4, *common, "secure_aggregation.enabled=true")
    for row in secure:
        assert row["secagg_survivors"] == [4, 4, 4, 4] and row["clients"] == 4
        assert row["round_failed"] is None
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "secure" / "adapter" / "adapter_model.safetensors"))
    step = 2 * 0.1 / (2**16 - 1)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= step * 1.01  # the mean of stochastically rounded values is within one step
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it really went through the fixed-point encoding
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in secure]  # same seeds, same start


def test_a_client_that_vanishes_after_sharing_keys_is_recovered(tmp_path: Path) -> None:
    rows = _run(
        tmp_path,
        "dropout",
        SITES4,
        "federation.rounds=1",
        "secure_aggregation.enabled=true",
        "federation.min_clients=3",
        "deploy.round_timeout_s=8",
        vanish="site-d",
    )
    (row,) = rows
    assert row["secagg_survivors"] == [4, 4, 3, 3], row
    assert row["clients"] == 3 and row["stragglers"] == ["site-d"]
    assert row["round_failed"] is None


def test_an_update_in_the_clear_is_refused_in_a_secure_round(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, SITES4[:2])
    config = deploy_config(
        tmp_path,
        certs,
        SITES4[:2],
        "secure_aggregation.enabled=true",
        "federation.rounds=1",
        "deploy.stage_timeout_s=20",
        "deploy.min_connected=1",
    )
    with running_server(config) as server:
        stub = Stub(open_channel(server.target, certs / "clients" / "site-a"))
        join = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, num_examples=10)
        session = pb.JoinReply.FromString(stub.join(join.SerializeToString(), timeout=30)).session
        deadline = time.monotonic() + 60
        found = None
        while time.monotonic() < deadline:
            found = get_task(stub, session, 3584)
            if isinstance(found, tuple) and found[0].kind == pb.TASK_EVALUATE:  # round 0: evaluate first
                task, _, _ = found
                RoundCalls(stub, session, task, 1 << 20).send(EvalReport("site-a", 1.0, 10))
                continue
            if isinstance(found, tuple):
                break
            time.sleep(0.05)
        assert isinstance(found, tuple)
        task, global_flat, _ = found
        header = pb.UpdateHeader(
            session=session,
            round=task.round,
            nonce=task.nonce,
            encoding=pb.ENCODING_FLOAT32,
            total_bytes=global_flat.numel() * 4,
            num_examples=10,
        )
        chunks = [pb.UpdateChunk(header=header).SerializeToString()]
        chunks.append(pb.UpdateChunk(data=bytes(global_flat.numel() * 4)).SerializeToString())
        with pytest.raises(grpc.RpcError) as refused:
            stub.submit(iter(chunks), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "wrong_encoding" in refused.value.details()
