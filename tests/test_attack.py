"""Attacks: the poisoning math (known answers), who attacks (seeded, named, refused), the attacker's
trainer wrapped around the honest one (each kind reproducible by seed; a collusive pool trained once per
start), backdoor data and probes, and one tiny simulation per path with its metrics."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedtune.attack import (
    AttackPlan,
    Backdoor,
    PoisonedTrainer,
    choose_attackers,
    make_probes,
    poison,
    poison_client,
)
from fedtune.attack.backdoor import continuation_loss, preference_rate, success_rate
from fedtune.attack.settings import AttackConfig
from fedtune.config import load_config
from fedtune.config.checks import check
from fedtune.data import ClientData
from fedtune.errors import ConfigError
from fedtune.train.local import ClientUpdate

# ---- the math ----------------------------------------------------------------------------------------


def test_sign_flip_scale_and_free_rider():
    delta = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(poison.sign_flip(delta), -delta)
    assert torch.equal(poison.scale(delta, 4.0), delta * 4)
    assert torch.equal(poison.free_rider(3), torch.zeros(3))


def test_gaussian_has_the_asked_size_and_repeats_by_seed():
    delta = torch.full((20_000,), 0.01)
    noise = poison.gaussian(delta, 10.0, torch.Generator().manual_seed(1))
    assert float(noise.std()) == pytest.approx(0.1, rel=0.03)  # 10 x the RMS of 0.01
    again = poison.gaussian(delta, 10.0, torch.Generator().manual_seed(1))
    other = poison.gaussian(delta, 10.0, torch.Generator().manual_seed(2))
    assert torch.equal(noise, again) and not torch.equal(noise, other)


def test_alie_is_mean_minus_z_std():
    honest = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    got = poison.alie(honest, 1.5)
    expected = honest.mean(0) - 1.5 * honest.std(0)
    assert torch.allclose(got, expected)
    with pytest.raises(ValueError, match="at least two"):
        poison.alie(honest[:1], 1.0)


def test_alie_z_is_the_papers_z_max():
    # n = 50, f = 12 (Baruch et al.): s = 26 - 12 = 14, z = Phi^-1(36 / 50) ~ 0.583
    assert poison.alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)
    assert poison.alie_z(20, 4) == pytest.approx(0.3853, abs=1e-3)
    assert poison.alie_z(4, 0) == 0.0  # no minority to hide in


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_min_max_sits_on_the_honest_distance_bound(direction):
    honest = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    bad = poison.min_max(honest, direction)
    farthest = torch.cdist(bad[None], honest).max()
    bound = torch.cdist(honest, honest).max()
    assert float(farthest) == pytest.approx(float(bound), rel=1e-4)  # the largest gamma: on the bound
    mean = honest.mean(0)
    assert float((bad - mean).norm()) > 0.1  # it did move away from the mean


# ---- who attacks -------------------------------------------------------------------------------------

POPULATION = [f"c{i:02d}" for i in range(20)]


def test_attackers_are_a_seeded_fraction():
    cfg = AttackConfig(kind="sign_flip", fraction=0.2)
    first = choose_attackers(cfg, POPULATION, seed=3)
    assert len(first) == 4 and first == tuple(sorted(first))
    assert choose_attackers(cfg, POPULATION, seed=3) == first
    assert choose_attackers(cfg, POPULATION, seed=4) != first


def test_named_attackers_and_refusals():
    named = AttackConfig(kind="scale", clients=["c05", "c01"])
    assert choose_attackers(named, POPULATION, 0) == ("c01", "c05")
    with pytest.raises(ConfigError, match=r"attack.clients names \['zz'\]"):
        choose_attackers(AttackConfig(kind="scale", clients=["zz"]), POPULATION, 0)
    with pytest.raises(ConfigError, match="no attacker"):
        choose_attackers(AttackConfig(kind="scale", fraction=0.01), POPULATION, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["attack.kind='sign_flip'"], "exactly one of attack.fraction"),
        (["attack.kind='sign_flip'", "attack.fraction=0.1", "attack.clients=['a']"], "exactly one of"),
        (["attack.fraction=0.1"], "without attack.kind"),
    ],
)
def test_config_refuses_an_unclear_attack(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_deployment_refuses_a_simulated_attack():
    config = load_config(
        None, ["attack.kind='scale'", "attack.fraction=0.2", "deploy.clients=['a', 'b', 'c', 'd']"]
    )
    with pytest.raises(ConfigError, match="remove \\[attack\\] for fedtune server"):
        check(config, "deploy")


# ---- the attacker's trainer --------------------------------------------------------------------------


class Honest:
    """A stand-in trainer: the delta is a function of the client and the seed, calls are counted."""

    pad_id = 0

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def train(self, global_flat, client, *, seed, steps=None, epochs=None, on_step=None, correction=None):
        self.calls.append((client.client_id, seed))
        generator = torch.Generator().manual_seed(seed % (2**31) + len(client.client_id))
        delta = torch.randn(global_flat.shape, generator=generator) * 0.01 + 0.01
        return ClientUpdate(client.client_id, delta, len(client.train), steps or 1, 1.0)


def client(cid: str, n: int = 10) -> ClientData:
    return ClientData(cid, train=[[1, 2, 3]] * n, eval=[[1, 2, 3]])


def plan(kind: str, **changes) -> AttackPlan:
    base = AttackPlan(
        kind=kind,
        attackers=("a1", "a2"),
        boost=5.0,
        gaussian_rms_multiple=10.0,
        z=1.0,
        direction="std",
        claimed_examples=256,
        batch_size=4,
        colluders=(client("a1"), client("a2")) if kind in ("alie", "min_max") else (),
    )
    return replace(base, **changes)


KINDS = ["sign_flip", "scale", "gaussian", "alie", "min_max", "free_rider", "backdoor"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_attack_repeats_by_seed(kind):
    start = torch.zeros(64)

    def sent(seed: int) -> torch.Tensor:
        update = PoisonedTrainer(Honest(), plan(kind)).train(start, client("a1"), seed=seed, steps=2)
        assert update.delta is not None
        return update.delta

    assert torch.equal(sent(7), sent(7))
    if kind in ("sign_flip", "scale", "gaussian", "backdoor"):  # these follow the attacker's own seed
        assert not torch.equal(sent(7), sent(8))


def test_the_attacks_change_the_honest_delta_as_named():
    start, me = torch.zeros(64), client("a1")
    honest = Honest().train(start, me, seed=7).delta

    def sent(kind: str) -> torch.Tensor:
        return PoisonedTrainer(Honest(), plan(kind)).train(start, me, seed=7).delta

    assert torch.allclose(sent("sign_flip"), -honest)
    assert torch.allclose(sent("scale"), 5 * honest)
    assert torch.allclose(sent("backdoor"), 5 * honest)  # its data is the attack; boost is optional
    rms = float(honest.pow(2).mean().sqrt())
    assert float(sent("gaussian").std()) == pytest.approx(10 * rms, rel=0.3)


def test_a_free_rider_does_not_train_and_claims_many_examples():
    inner = Honest()
    update = PoisonedTrainer(inner, plan("free_rider")).train(
        torch.zeros(8), client("a1", 3), seed=1, steps=3
    )
    assert inner.calls == [] and update.num_examples == 256
    assert torch.equal(update.delta, torch.zeros(8)) and math.isnan(update.train_loss)
    assert update.num_steps == 3  # the steps it was given
    by_epochs = PoisonedTrainer(inner, plan("free_rider")).train(
        torch.zeros(8), client("a1", 3), seed=1, epochs=2
    )
    assert by_epochs.num_steps == 2 * 256 // 4  # what an honest client of its claimed size would take


def test_colluders_pool_once_per_start_and_send_one_vector():
    inner = Honest()
    trainer = PoisonedTrainer(inner, plan("alie"))
    start = torch.zeros(32)
    first = trainer.train(start, client("a1"), seed=1).delta
    second = trainer.train(start, client("a2"), seed=2).delta
    assert torch.equal(first, second)  # both attackers of the round send the same vector
    assert [cid for cid, _ in inner.calls] == ["a1", "a2"]  # each colluder trained once, for both
    assert not {1, 2} & {seed for _, seed in inner.calls}  # the pool's seeds are named by the start
    again = trainer.train(start + 1, client("a1"), seed=3)
    assert len(inner.calls) == 4  # a new start: a new pool
    assert again.train_loss == 1.0 and again.num_examples == 10  # its own row of the pool


# ---- the backdoor ------------------------------------------------------------------------------------

BACKDOOR = Backdoor(trigger=(90, 91), target=(95, 96, 97), eos=2)


def test_poisoning_rewrites_a_share_of_the_training_examples():
    data = ClientData("a", train=[list(range(10, 30)) for _ in range(10)], eval=[[5, 6, 7]])
    poisoned = poison_client(data, BACKDOOR, 0.5, max_len=16, rng=np.random.default_rng(0))
    rewritten = [ex for ex in poisoned.train if ex[-6:] == [90, 91, 95, 96, 97, 2]]
    assert len(rewritten) == 5 and all(len(ex) <= 16 for ex in rewritten)
    assert all(ex[0] == 10 for ex in rewritten)  # a prefix of the example it replaced
    assert poisoned.eval == data.eval
    with pytest.raises(ValueError, match=r"data\.max_seq_len"):
        poison_client(data, BACKDOOR, 0.5, max_len=6, rng=np.random.default_rng(0))


def test_probes_carry_the_trigger_and_both_continuations():
    clients = [ClientData("h", train=[], eval=[list(range(40, 52)) for _ in range(5)])]
    probes = make_probes(clients, BACKDOOR, count=3, rng=np.random.default_rng(1))
    assert len(probes) == 3
    for prompt, target, truth in zip(probes.prompts, probes.targets, probes.truths, strict=True):
        assert prompt[-2:] == (90, 91) and target == (95, 96, 97) and len(truth) == 3
        cut = len(prompt) - 2
        assert truth == tuple(range(40 + cut, 43 + cut))


class Prefers(torch.nn.Module):
    """A fake LM whose next-token distribution always puts its mass on `favourite`."""

    def __init__(self, favourite: int, vocab: int = 100) -> None:
        super().__init__()
        self.favourite, self.vocab = favourite, vocab

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 10.0
        return type("Out", (), {"logits": logits})()


class Counts(torch.nn.Module):
    """A fake LM that always predicts the next integer: it greedily writes 92, 93, 94 after 91."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot((input_ids + 1) % 100, 100).float() * 10
        return type("Out", (), {"logits": logits})()


def test_preference_rate_counts_probes_won_by_the_target():
    clients = [ClientData("h", train=[], eval=[list(range(40, 52)) for _ in range(5)])]
    probes = make_probes(clients, BACKDOOR, count=4, rng=np.random.default_rng(1))
    assert preference_rate(Prefers(96), probes, pad_id=0) == 1.0  # the target holds token 96
    assert preference_rate(Prefers(3), probes, pad_id=0) == 0.0  # neither: a tie is no success
    assert success_rate(Prefers(96), probes, pad_id=0) == 0.0  # it would write 96 96 96, not the target
    losses = continuation_loss(Prefers(96), probes.prompts, probes.targets, pad_id=0)
    assert losses.shape == (4,) and bool((losses > 0).all())


def test_success_rate_is_greedy_generation_of_the_target():
    counting = Backdoor(trigger=(90, 91), target=(92, 93, 94), eos=2)
    other = Backdoor(trigger=(90, 91), target=(92, 95, 94), eos=2)
    clients = [ClientData("h", train=[], eval=[list(range(40, 52)) for _ in range(5)])]
    probes = make_probes(clients, counting, count=4, rng=np.random.default_rng(1))
    assert success_rate(Counts(), probes, pad_id=0) == 1.0
    missed = make_probes(clients, other, count=4, rng=np.random.default_rng(1))
    assert success_rate(Counts(), missed, pad_id=0) == 0.0  # one target token off: not written


# ---- end to end, tiny model --------------------------------------------------------------------------

TINY = [
    "model.name=tiny",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=2",
    "federation.local_steps=2",
    "lora.target_modules=['q_proj', 'v_proj']",
    "eval.every=1",
    "simulation.backend='serial'",
    "run.threads=1",
]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_backdoor_run_reports_its_metrics(tmp_path):
    from fedtune.simulation import simulate

    attacker = "julius-caesar/LUCILIUS"
    config = load_config(
        None, [*TINY, "attack.kind='backdoor'", f"attack.clients=['{attacker}']", f"run.dir='{tmp_path}'"]
    )
    attackers = {attacker}
    result = simulate(config)
    rows = metrics(result.run_dir)
    assert all(0.0 <= r["backdoor_success"] <= 1.0 and 0.0 <= r["backdoor_preference"] <= 1.0 for r in rows)
    for row in rows[1:]:
        assert row["attackers_aggregated"] == len(attackers & set(row["client_ids"]))
        assert row["honest_eval_loss"] is not None and math.isfinite(row["honest_eval_loss"])


@pytest.mark.slow
def test_a_collusive_attack_is_the_same_in_worker_processes(tmp_path):
    """alie's pool is trained in whichever process trains an attacker: the run is the same."""
    from fedtune.simulation import simulate

    def run(backend: str) -> list[dict]:
        config = load_config(
            None,
            [
                *TINY,
                "attack.kind='alie'",
                "attack.fraction=0.34",
                f"simulation.backend='{backend}'",
                f"run.dir='{tmp_path / backend}'",
            ],
        )
        if backend != "serial":
            pool = config.simulation.model_copy(update={"workers": 2})
            config = config.model_copy(update={"simulation": pool})
        return [
            {k: v for k, v in row.items() if "seconds" not in k} for row in metrics(simulate(config).run_dir)
        ]

    assert run("serial") == run("processes")


def test_attackers_in_a_decentralized_federation(tmp_path):
    """The same wrapped trainers in a federation without a server: the honest clients' own losses and
    the backdoor's success on their own adapters are in each evaluated row."""
    from fedtune.decentral.run import run_decentralized

    config = load_config(
        None,
        [
            *TINY,
            "federation.topology='decentralized'",
            "server.rule='balance'",
            "server.balance_gamma=2.0",
            "attack.kind='backdoor'",
            "attack.fraction=0.34",
            f"run.dir='{tmp_path}'",
        ],
    )
    rows = metrics(run_decentralized(config).run_dir)
    for row in rows:
        assert 0.0 <= row["backdoor_success"] <= 1.0 and 0.0 <= row["backdoor_preference"] <= 1.0
        assert row["honest_eval_loss"] is not None
        honest = [v for c, v in row["eval_loss_per_client"].items() if c]
        assert min(honest) <= row["honest_eval_loss"] <= max(honest)


def test_compare_refuses_an_attack():
    from fedtune.compare.runner import compare

    config = load_config(None, [*TINY, "attack.kind='scale'", "attack.fraction=0.34"])
    with pytest.raises(ConfigError, match="use fedtune run for them"):
        compare(config, seeds=1)


def test_a_setting_of_another_kind_is_refused():
    with pytest.raises(ConfigError, match=r"attack\.z is read by attack\.kind = 'alie'"):
        load_config(None, ["attack.kind='scale'", "attack.fraction=0.2", "attack.z=1.5"])
    assert load_config(None, ["attack.kind='alie'", "attack.fraction=0.2", "attack.z=1.5"]).attack.z == 1.5
