"""FLTrust's server side: its root data (sampled from the clients' clean data, or a file), the server's
own update as the reference (repeatable, A's values only under split personalization), the refusals, and
one tiny simulation where it holds against a boosted attacker that wrecks FedAvg."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtune.config import load_config
from fedtune.config.checks import check
from fedtune.data import ClientData
from fedtune.errors import ConfigError
from fedtune.local import RootUpdate, load_model, root_data, tokenizer_for

TINY = [
    "model.name=tiny",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=6",
    "federation.clients_per_round=6",
    "federation.rounds=2",
    "federation.local_steps=3",
    "train.lr=0.02",
    "lora.target_modules=['q_proj', 'v_proj', 'lm_head']",
    "simulation.backend='serial'",
    "run.threads=1",
]


def clients() -> list[ClientData]:
    return [ClientData(f"c{i}", train=[[i, k, 7] for k in range(10)], eval=[[1, 2]]) for i in range(5)]


def test_sampled_root_data_is_seeded_and_clean(tokenizer):
    config = load_config(None, ["server.rule='fltrust'", "server.root_examples=12"])
    root = root_data(config, tokenizer, clients())
    pool = [ex for c in clients() for ex in c.train]
    assert len(root.train) == 12 and all(ex in pool for ex in root.train) and root.eval == []
    assert root_data(config, tokenizer, clients()) == root
    other = config.model_copy(update={"run": config.run.model_copy(update={"seed": 5})})
    assert root_data(other, tokenizer, clients()) != root


def test_root_data_from_a_file(tmp_path, tokenizer):
    path = tmp_path / "root.jsonl"
    path.write_text("".join(json.dumps({"text": f"trusted line {i}"}) + "\n" for i in range(30)))
    config = load_config(
        None, ["server.rule='fltrust'", f"server.root_data='{path}'", "server.root_examples=20"]
    )
    root = root_data(config, tokenizer)
    assert len(root.train) == 20


def test_root_data_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a \.jsonl"):
        load_config(None, ["server.rule='fltrust'", f"server.root_data='{tmp_path / 'missing.jsonl'}'"])
    sets = ["server.rule='fltrust'", "deploy.clients=['a', 'b', 'c']", "federation.clients_per_round=3"]
    config = load_config(None, sets)
    with pytest.raises(ConfigError, match="a deployed server does not hold"):
        check(config, "deploy")


def test_the_reference_repeats_for_one_adapter_and_follows_it():
    config = load_config(None, [*TINY, "server.rule='fltrust'", "server.root_examples=8"])
    model_dir, tokenizer = tokenizer_for(config)
    local = load_model(config, model_dir, tokenizer.pad_token_id)
    root = ClientData("server-root", train=[[5, 6, 7, 8, 9]] * 8, eval=[])
    reference = RootUpdate.over(config, local, root)
    start = local.adapter.get()
    first = reference(start)
    assert torch.equal(first, reference(start)) and float(first.norm()) > 0
    assert not torch.equal(first, reference(start + 0.01))
    split = config.model_copy(
        update={"personalize": config.personalize.model_copy(update={"method": "split"})}
    )
    masked = RootUpdate.over(split, local, root)(start)
    b_values = ~local.adapter.layout.a_mask
    assert float(masked[b_values].abs().max()) == 0.0 and float(masked.norm()) > 0


def final_loss(tmp_path, rule: str) -> float:
    from fedtune.simulation import simulate

    config = load_config(
        None,
        [
            *TINY,
            f"server.rule='{rule}'",
            "attack.kind='scale'",
            "attack.fraction=0.2",
            "attack.boost=30.0",
            f"run.dir='{tmp_path / rule}'",
        ],
    )
    rows = [json.loads(x) for x in (simulate(config).run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["attackers_aggregated"] is not None
    return rows[-1]["honest_eval_loss"]


def test_fltrust_holds_where_fedavg_follows_a_boosted_attacker(tmp_path):
    fedavg, fltrust = final_loss(tmp_path, "fedavg"), final_loss(tmp_path, "fltrust")
    assert math.isfinite(fltrust)
    assert fltrust < fedavg
