"""One round engine, two transports: the same config simulated and deployed gives the same run.

Each case runs a config once with `fedtune.simulate` (the sites' files as a folder source: one file per
client, loaded as each site loads its own) and once as a deployment (a real gRPC server with mutual TLS
on loopback, one thread per site running `fedtune client`'s code). The global adapters must be
bit-identical, and every metric row the same, key for key and value for value, timings aside: plain
FedAvg with a server optimizer, secure aggregation with a client that vanishes after sharing its keys,
8-bit compression with error feedback, central DP with the noise generator injected into both, and
SCAFFOLD (clients keeping their controls over rounds; and through secure aggregation), and split
personalization (A's values only on the wire, each site's B and personal adapter in its folder).
DP-SGD and distributed DP, whose noise a site draws from its own OS, are compared on what is
deterministic: their privacy accounting.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import Config
from fedtune.deploy.site import run_client
from fedtune.round.inprocess import ExplicitDropouts
from fedtune.round.plan import DpRandomness
from fedtune.rundir import RunDir
from fedtune.secagg import Stage
from fedtune.simulation import simulate
from tests.deploy_fixtures import (
    deploy_config,
    evaluate_then_vanish,
    make_certs,
    make_site_data,
    running_server,
)

pytestmark = pytest.mark.slow
SITES = ("site-a", "site-b", "site-c", "site-d")
TIMINGS = {"seconds", "train_seconds", "eval_seconds", "secagg_server_seconds"}


def config_for(root: Path, name: str, *overrides: str) -> Config:
    certs = root / "certs"
    if not certs.exists():
        make_certs(root, SITES)
    (root / "sites").mkdir(exist_ok=True)
    make_site_data(root / "sites", SITES)
    return deploy_config(
        root,
        certs,
        SITES,
        f"run.dir='{root / name}'",
        f"data.source='{root / 'sites'}'",
        "federation.num_clients='all'",
        "federation.clients_per_round=3",
        "lora.target_modules=['q_proj', 'v_proj', 'lm_head']",
        "train.lr=0.02",
        "eval.every=1",
        *overrides,
    )


def simulated(config: Config, **options: Any) -> tuple[list[dict], dict[str, torch.Tensor]]:
    config = config.model_copy(
        update={"run": config.run.model_copy(update={"dir": config.run.resolved_dir / "sim"})}
    )
    result = simulate(config, **options)
    return RunDir(result.run_dir).read_metrics(), load_file(
        str(result.run_dir / "adapter" / "adapter_model.safetensors")
    )


def deployed(
    config: Config, *, vanish: str | None = None, **options: Any
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A deployment with a thread per site; `vanish` evaluates round 0, shares its keys in round 1 and
    goes silent."""
    root = config.run.resolved_dir.parent
    certs = root / "certs"
    errors: list[BaseException] = []

    def site(sid: str, target: str) -> None:
        try:
            run_client(
                target, root / "sites" / f"{sid}.jsonl", certs=certs / "clients" / sid, give_up_after_s=60
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    with running_server(config, **options) as server:
        threads = [
            threading.Thread(target=site, args=(s, server.target), daemon=True) for s in SITES if s != vanish
        ]
        for t in threads:
            t.start()
        if vanish is not None:
            evaluate_then_vanish(
                server.target, certs / "clients" / vanish, root / "sites" / f"{vanish}.jsonl"
            )
        server.thread.join(timeout=300)
        assert "result" in server.result, server.result.get("error")
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    run_dir = config.run.resolved_dir
    return RunDir(run_dir).read_metrics(), load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def same_rows(sim: list[dict], dep: list[dict]) -> None:
    assert [r["round"] for r in sim] == [r["round"] for r in dep]
    for s, d in zip(sim, dep, strict=True):
        assert set(s) == set(d), set(s) ^ set(d)
        for key in set(s) - TIMINGS:
            assert s[key] == d[key], (s["round"], key, s[key], d[key])


def same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_plain_fedavg_with_a_server_optimizer(tmp_path: Path) -> None:
    config = config_for(tmp_path, "adam", "federation.rounds=2", "server.optimizer='adam'", "server.lr=0.01")
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    assert sim_rows[-1]["eval_loss"] < sim_rows[0]["eval_loss"]  # it learned, the same in both
    assert [len(r["client_ids"]) for r in dep_rows[1:]] == [3, 3]


def test_secure_aggregation_with_a_client_that_vanishes_after_sharing_keys(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        "secure",
        "federation.rounds=1",
        "federation.clients_per_round=4",
        "federation.min_clients=3",
        "secure_aggregation.enabled=true",
        "secure_aggregation.clip_range=1.0",
        "secure_aggregation.bits=20",
        "deploy.round_timeout_s=8",
    )
    sim_rows, sim_adapter = simulated(config, dropouts=ExplicitDropouts({(1, "site-d"): Stage.MASKED_INPUT}))
    dep_rows, dep_adapter = deployed(config, vanish="site-d")
    same_rows(sim_rows, dep_rows)
    row = dep_rows[1]
    assert row["secagg_survivors"] == [4, 4, 3, 3] and row["clients"] == 3
    assert row["stragglers"] == ["site-d"] and row["round_failed"] is None
    assert row["eval_clients"] == 3 and dep_rows[0]["eval_clients"] == 4
    step = 2 * 1.0 / (2**20 - 1)
    worst = max(float((sim_adapter[k] - dep_adapter[k]).abs().max()) for k in sim_adapter)
    assert worst <= step  # the bound the issue asks for; with one rounding stream per client it is 0
    same_adapter(sim_adapter, dep_adapter)


def test_8bit_compression_with_error_feedback(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        "compressed",
        "federation.rounds=3",
        "compression.method='quantize'",
        "compression.bits=8",
        "compression.error_feedback=true",
    )
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    numel = sum(t.numel() for t in dep_adapter.values())
    assert all(r["bytes_up"] < 3 * numel * 4 / 3 for r in dep_rows[1:])  # about a byte a value, not 4


def seeded_dp() -> DpRandomness:
    """Injected DP randomness (tests only: a seeded generator voids the guarantee)."""
    return DpRandomness(
        torch.Generator().manual_seed(11), np.random.default_rng(12), np.random.default_rng(13)
    )


def test_central_dp_with_the_noise_generator_injected(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        "central",
        "federation.rounds=2",
        "federation.clients_per_round=4",
        "privacy.mode='central'",
        "privacy.noise_multiplier=0.8",
        "privacy.clip_l2_norm=0.5",
    )
    sim_rows, sim_adapter = simulated(config, dp_randomness=seeded_dp())
    dep_rows, dep_adapter = deployed(config, dp_randomness=seeded_dp())
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    assert "client_ids" not in dep_rows[1] and dep_rows[2]["epsilon"] > dep_rows[1]["epsilon"] > 0


def test_dpsgd_and_distributed_dp_run_over_the_network_and_account_as_simulated(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        "private",
        "federation.rounds=2",
        "federation.clients_per_round=4",
        "lora.target_modules=['q_proj', 'v_proj']",
        "dpsgd.enabled=true",
        "dpsgd.delta=1e-3",
        "privacy.mode='distributed'",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_l2_norm=1.0",
        "secure_aggregation.enabled=true",
        "secure_aggregation.clip_range=1.0",
    )
    sim_rows, _ = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    accounting = ("epsilon", "epsilon_known_cohort", "dp_noise_std", "dpsgd_epsilon_max", "secagg_survivors")
    for s, d in zip(sim_rows, dep_rows, strict=True):
        assert set(s) == set(d)
        for key in accounting:
            assert s.get(key) == pytest.approx(d.get(key)), key
    assert all(r["dpsgd_epsilon_max"] > 0 for r in dep_rows[1:])  # each site ran DP-SGD and said so
    assert dep_rows[-1]["epsilon"] > 0 and dep_rows[1]["secagg_survivors"] == [4, 4, 4, 4]
    assert any(float(t.abs().max()) > 0 for n, t in dep_adapter.items() if "lora_B" in n)


def test_ffa_with_secure_aggregation(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        "ffa",
        "federation.rounds=2",
        "server.lora_aggregation='ffa'",
        "secure_aggregation.enabled=true",
        "secure_aggregation.clip_range=1.0",
        "secure_aggregation.bits=20",
    )
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    assert dep_rows[-1]["eval_loss"] < dep_rows[0]["eval_loss"]


def test_svd_aggregation_in_slot_order_whatever_the_arrival(tmp_path: Path) -> None:
    config = config_for(tmp_path, "svd", "federation.rounds=2", "server.lora_aggregation='svd'")
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    assert all(0 < r["svd_residual"] < 1 for r in dep_rows[1:])


def test_scaffold_over_rounds_where_clients_keep_their_controls(tmp_path: Path) -> None:
    config = config_for(tmp_path, "scaffold", "federation.rounds=3", "server.control_variates='scaffold'")
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    numel = sum(t.numel() for t in dep_adapter.values())
    # the task carries the control after the adapter, the update its control delta after the delta
    assert all(r["bytes_down"] == r["bytes_up"] == 3 * 2 * numel * 4 for r in dep_rows[1:])
    trained = set().union(*(r["client_ids"] for r in dep_rows[1:]))
    assert len(trained) == 4  # so some client kept a control from an earlier round
    for site in SITES:  # each site kept its control in its folder
        assert (tmp_path / "certs" / "clients" / site / "client_state.safetensors").is_file()


def test_scaffold_with_secure_aggregation(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        "scaffold-secure",
        "federation.rounds=2",
        "federation.clients_per_round=4",
        "server.control_variates='scaffold'",
        "secure_aggregation.enabled=true",
        "secure_aggregation.clip_range=1.0",
        "secure_aggregation.bits=20",
    )
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    assert dep_rows[2]["secagg_survivors"] == [4, 4, 4, 4] and dep_rows[2]["round_failed"] is None


def test_split_personalization_sends_a_only_and_each_site_keeps_its_b(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = config_for(
        tmp_path, "split", "federation.rounds=2", "personalize.method='split'", "personalize.steps=2"
    )
    sim_rows, sim_adapter = simulated(config)
    dep_rows, dep_adapter = deployed(config)
    same_rows(sim_rows, dep_rows)
    same_adapter(sim_adapter, dep_adapter)
    a_values = sum(t.numel() for name, t in dep_adapter.items() if "lora_A" in name)
    # every update that crossed the wire was A's values (the server refuses any other size), never B
    assert all(r["bytes_up"] == r["clients"] * a_values * 4 for r in dep_rows[1:])
    assert all(torch.count_nonzero(t) == 0 for name, t in dep_adapter.items() if "lora_B" in name)
    assert dep_rows[-1]["personal_eval_loss"] < dep_rows[0]["eval_loss"]
    for site in SITES:  # each site wrote its personal adapter in its own folder: the global A, its own B
        folder = tmp_path / "certs" / "clients" / site / "personal"
        personal = load_file(str(folder / "adapter_model.safetensors"))
        assert all(torch.equal(personal[n], dep_adapter[n]) for n in personal if "lora_A" in n)
        assert any(torch.count_nonzero(personal[n]) > 0 for n in personal if "lora_B" in n)
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))  # plain PEFT
