"""Personal adapters on the tiny model: finetune, ditto and split, in simulation.

Known answers: finetune with 0 steps is the global adapter; a personal adapter saved under
runs/<name>/personal/<client>/ loads with plain PEFT and scores the loss the run reported; Ditto's personal
adapter after one round is the local trainer's, pulled toward the global one; split sends A's values only,
keeps the global B at zero and each client's B in its personal adapter. And the refusals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.config import load_config
from fedtune.config.plan import participant_spec
from fedtune.errors import ConfigError
from fedtune.evaluate import client_nll
from fedtune.local import make_personal_trainer
from fedtune.round.messages import EvalRequest, TrainRequest, TrainTask
from fedtune.round.participant import Participant
from fedtune.round.plan import Member
from fedtune.round.state import ClientStateStore
from fedtune.rundir import client_dir
from fedtune.seeding import derive_seed
from fedtune.simulation import simulate
from fedtune.train.local import LocalModel

SMALL = [
    "model.name=tiny",
    "run.threads=1",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=4",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "federation.local_steps=3",
    "train.lr=0.05",
    "lora.target_modules=['q_proj', 'v_proj', 'lm_head']",
    "eval.max_examples_per_client=4",
]


def run(tmp_path: Path, name: str, *overrides: str):
    config = load_config(None, [*SMALL, f"run.dir='{tmp_path / name}'", *overrides])
    return simulate(config)


def last_row(result) -> dict:
    return json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_finetune_with_zero_steps_is_the_global_adapter(tmp_path: Path) -> None:
    result = run(tmp_path, "zero", "personalize.method='finetune'", "personalize.steps=0")
    after = result.after
    assert after.personal is not None
    assert after.personal.per_client_loss == after.per_client_loss
    assert after.personal.loss == after.loss
    row = last_row(result)
    assert row["personal_eval_loss"] == row["eval_loss"]
    global_adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    for cid in after.per_client_loss:
        personal = load_file(str(client_dir(result.run_dir / "personal", cid) / "adapter_model.safetensors"))
        assert personal.keys() == global_adapter.keys()
        assert all(torch.equal(personal[k], global_adapter[k]) for k in personal)


def test_finetuned_personal_adapters_load_with_plain_peft_and_score_what_was_reported(
    tmp_path: Path, tokenizer
) -> None:
    result = run(tmp_path, "finetune", "personalize.method='finetune'", "personalize.steps=4")
    after = result.after
    assert after.personal is not None
    # every evaluated client has its own adapter (whether it helps is the benchmark's question: the
    # random-init tiny model says little about that)
    assert after.personal.per_client_loss.keys() == after.per_client_loss.keys()
    assert all(after.personal.per_client_loss[c] != after.per_client_loss[c] for c in after.per_client_loss)
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert all(set(v) == {"before", "after", "personal"} for v in clients.values())
    assert "personal" in (result.run_dir / "report.md").read_text()

    from fedtune.data import load_clients
    from fedtune.seeding import numpy_rng

    config = load_config(None, [*SMALL, f"run.dir='{tmp_path / 'finetune'}'"])
    data = {
        c.client_id: c
        for c in load_clients(config.data, 4, tokenizer, numpy_rng(config.data_seed, "data"), seed=0)
    }
    cid = sorted(after.per_client_loss)[0]
    folder = client_dir(result.run_dir / "personal", cid)
    base_dir = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(folder))
    nll = client_nll(model, data[cid], max_examples=4, batch_size=8, pad_id=tokenizer.pad_token_id)
    assert math.isclose(nll.nll / nll.tokens, after.personal.per_client_loss[cid], rel_tol=1e-5)


def participant_with(config, trainer, client):
    local = LocalModel(trainer.model, trainer.adapter, trainer.pad_id)
    return Participant(
        client,
        local,
        trainer,
        ClientStateStore(),
        participant_spec(config),
        personal_trainer=make_personal_trainer(config, local),
    )


def test_ditto_personal_adapter_is_the_local_trainers_pulled_toward_the_global(trainer, client) -> None:
    config = load_config(
        None, ["personalize.method='ditto'", "personalize.lambda=0.5", "federation.local_steps=3"]
    )
    participant = participant_with(config, trainer, client)
    start = trainer.adapter.get()
    member = Member(0, 2, client.client_id)
    participant.respond(TrainRequest(TrainTask(1, start, None, None), member))
    personal = participant.states.get(client.client_id).personal
    assert personal is not None

    pulled = make_personal_trainer(config, LocalModel(trainer.model, trainer.adapter, trainer.pad_id))
    assert pulled is not None and pulled.cfg.proximal_mu == 0.5
    seed = derive_seed(config.run.seed, "ditto", 1, 2)
    expected = start + pulled.train(start, client, seed=seed, steps=3, anchor=start).delta
    assert torch.equal(personal, expected)
    assert not torch.equal(personal, start)
    # the last evaluation reports it, and ditto keeps it (no further steps)
    report = participant.respond(EvalRequest(1, start, member, personalize=True))
    assert report.personal_nll is not None and report.personal_nll != report.nll
    assert torch.equal(participant.personal_adapter(EvalRequest(1, start, member, True)), personal)


def test_split_sends_a_only_and_keeps_b_at_the_client(trainer, client) -> None:
    config = load_config(None, ["personalize.method='split'", "federation.local_steps=3"])
    participant = participant_with(config, trainer, client)
    layout = trainer.adapter.layout
    a_mask = layout.a_mask
    start = trainer.adapter.get()
    member = Member(0, 0, client.client_id)
    sub = participant.respond(TrainRequest(TrainTask(1, start, None, None), member))
    assert sub.update.values.numel() == int(a_mask.sum()) < layout.numel
    personal = participant.states.get(client.client_id).personal
    assert not torch.equal(personal[~a_mask], start[~a_mask])  # B trained, and kept here
    assert torch.equal(personal[a_mask], start[a_mask] + sub.update.values)  # A's delta is what went
    # the next round starts from the new global A with this client's B
    moved = start.clone()
    moved[a_mask] += 0.01
    adapter = participant.personal_adapter(EvalRequest(2, moved, member, True))
    assert torch.equal(adapter[a_mask], moved[a_mask]) and torch.equal(adapter[~a_mask], personal[~a_mask])


def test_split_in_simulation_aggregates_a_and_leaves_the_global_b_at_zero(tmp_path: Path) -> None:
    result = run(tmp_path, "split", "personalize.method='split'")
    adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(t) == 0 for k, t in adapter.items() if "lora_B" in k)
    assert any(torch.count_nonzero(t) > 0 for k, t in adapter.items() if "lora_A" in k)
    a_values = sum(t.numel() for k, t in adapter.items() if "lora_A" in k)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_up"] == r["clients"] * a_values * 4 for r in rows[1:])
    # the global adapter alone is the base model; each client's own B makes its personal adapter
    assert result.after.loss == pytest.approx(result.before.loss, abs=1e-6)
    assert result.after.personal is not None and result.after.personal.loss < result.before.loss


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["personalize.method='split'", "server.lora_aggregation='ffa'"], "server.lora_aggregation"),
        (["personalize.method='split'", "server.control_variates='scaffold'"], "control_variates"),
        (["personalize.method='finetune'", "dpsgd.enabled=true"], "dpsgd.enabled"),
        (["personalize.method='ditto'", "personalize.steps=-1"], "personalize.steps"),
        (["personalize.method='clustered'"], "personalize.method"),
    ],
)
def test_refused_at_load_naming_the_field(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, overrides)


def test_split_through_secure_aggregation_matches_the_plain_sum(tmp_path: Path) -> None:
    plain = run(tmp_path, "plain", "personalize.method='split'")
    secure = run(
        tmp_path,
        "secure",
        "personalize.method='split'",
        "secure_aggregation.enabled=true",
        "secure_aggregation.clip_range=1.0",
        "secure_aggregation.bits=20",
    )
    a = load_file(str(plain.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(secure.run_dir / "adapter" / "adapter_model.safetensors"))
    # fixed-point rounding of 20 bits over +-1 is 2e-6 per value a round; later rounds train from the
    # rounded adapter, which carries it on (1.05e-4 at most here with transformers 5.24 / peft 0.21.2)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=5e-4), (name, float((a[name] - b[name]).abs().max()))
    assert all(torch.count_nonzero(t) == 0 for k, t in b.items() if "lora_B" in k)


def test_a_sites_personal_adapter_survives_its_restart_and_a_repeated_round(tmp_path: Path) -> None:
    from fedtune.deploy.site_state import SiteRunIdentity, SiteStateStore
    from fedtune.round.state import ClientState

    identity = SiteRunIdentity("site-a", "run", 0, 2, "0" * 32)
    store = SiteStateStore(tmp_path, identity)
    store.commit("site-a", 1, ClientState(personal=torch.tensor([1.0, 2.0])))
    store.commit("site-a", 2, ClientState(personal=torch.tensor([3.0, 4.0])))
    restarted = SiteStateStore(tmp_path, identity)
    assert torch.equal(restarted.get("site-a").personal, torch.tensor([3.0, 4.0]))
    # round 2 handed out again: it starts from the personal adapter it had before round 2
    assert torch.equal(restarted.begin("site-a", 2).personal, torch.tensor([1.0, 2.0]))
