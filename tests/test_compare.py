"""`fedtune compare` on the tiny model: the arms' budgets match as stated, compare's numbers are the arms'
own metrics.jsonl, and with one client local-only and centralized are the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.compare.runner import compare
from fedtune.config import load_config
from fedtune.rundir import client_dir

pytestmark = pytest.mark.slow

SMALL = [
    "model.name=tiny",
    "run.threads=1",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=5",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "federation.local_steps=3",
    "train.lr=0.05",
    "lora.target_modules=['q_proj', 'v_proj', 'lm_head']",
    "eval.max_examples_per_client=4",
    "personalize.method='finetune'",
    "personalize.steps=2",
    "personalize.lr=0.005",
]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    config = load_config(None, [*SMALL, f"run.dir='{root / 'run'}'"])
    return config, compare(config, seeds=2)


def test_every_arm_for_every_seed_on_the_same_clients(outcome) -> None:
    _, result = outcome
    comparison = result.comparison
    assert comparison.arms == ("base", "local", "centralized", "federated", "personalized")
    assert comparison.seeds == (0, 1)
    clients = set(comparison.tokens)
    assert len(clients) == 5
    for run in comparison.runs:
        assert set(run.per_client_loss) == clients, run.arm
    # the same held-out data for every seed: the base model scores it the same
    base = comparison.of("base")
    assert base[0].per_client_loss == base[1].per_client_loss
    # but training differs by seed
    fed = comparison.of("federated")
    assert fed[0].loss != fed[1].loss


def test_budgets_match_as_stated(outcome) -> None:
    config, result = outcome
    comparison, batch = result.comparison, config.train.batch_size
    for seed in comparison.seeds:
        fed_rows = rows(result.folder / f"seed-{seed}" / "federated")
        trained: dict[str, int] = {}
        for row in fed_rows[1:]:
            for cid in row["client_ids"]:
                trained[cid] = trained.get(cid, 0) + config.federation.local_steps
        federated, central = comparison.run("federated", seed), comparison.run("centralized", seed)
        local, personal = comparison.run("local", seed), comparison.run("personalized", seed)
        assert federated.steps == central.steps == local.steps == sum(trained.values())
        assert federated.examples == central.examples == local.examples == federated.steps * batch
        assert personal.steps == federated.steps + 5 * config.personalize.steps
        base = comparison.run("base", seed)
        for cid in trained:  # each client that trained in federation trains alone, in its own run
            (row,) = rows(client_dir(result.folder / f"seed-{seed}" / "local", cid))
            assert row["client_ids"] == [cid] and row["clients"] == 1
            assert local.per_client_loss[cid] != base.per_client_loss[cid]
        untrained = set(comparison.tokens) - set(trained)
        for cid in untrained:  # never trained in federation: alone it keeps the base model
            assert local.per_client_loss[cid] == base.per_client_loss[cid]
        assert central.bytes_moved > 0 and local.bytes_moved == 0
        assert federated.bytes_moved == sum(
            r["bytes_up"] + r["bytes_down"] + r["eval_bytes_down"] for r in fed_rows
        )
    budget = comparison.budget
    assert set(budget) == set(comparison.arms)
    assert f"{federated.steps} steps x batch {batch}" in budget["centralized"]


def test_numbers_are_the_arms_own_metrics(outcome) -> None:
    _, result = outcome
    comparison = result.comparison
    written = json.loads((result.folder / "compare.json").read_text())
    for seed in comparison.seeds:
        seed_dir = result.folder / f"seed-{seed}"
        fed_rows = rows(seed_dir / "federated")
        assert comparison.run("base", seed).loss == fed_rows[0]["eval_loss"]
        assert comparison.run("federated", seed).loss == fed_rows[-1]["eval_loss"]
        assert comparison.run("personalized", seed).loss == fed_rows[-1]["personal_eval_loss"]
        clients = json.loads((seed_dir / "federated" / "clients.json").read_text())
        for cid, losses in clients.items():
            assert comparison.run("federated", seed).per_client_loss[cid] == losses["after"]
            assert comparison.run("personalized", seed).per_client_loss[cid] == losses["personal"]
        (central,) = rows(seed_dir / "centralized")
        assert comparison.run("centralized", seed).loss == central["eval_loss"]
        local = comparison.run("local", seed)
        for cid, loss in local.per_client_loss.items():
            folder = client_dir(seed_dir / "local", cid)
            if folder.exists():
                assert loss == rows(folder)[0]["eval_loss"]
        tokens = comparison.tokens
        weighted = sum(loss * tokens[c] for c, loss in local.per_client_loss.items()) / sum(tokens.values())
        assert local.loss == pytest.approx(weighted, rel=1e-12)
    by_arm_seed = {(r["arm"], r["seed"]): r for r in written["runs"]}
    for run in comparison.runs:
        assert by_arm_seed[(run.arm, run.seed)]["loss"] == run.loss
    for name in ("report.md", "arms.png", "clients.png"):
        assert (result.folder / name).is_file()
    report = (result.folder / "report.md").read_text()
    assert all(line in report for line in result.lines)


def test_with_one_client_local_only_is_centralized(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            *SMALL,
            f"run.dir='{tmp_path / 'one'}'",
            "federation.num_clients=1",
            "federation.clients_per_round=1",
            "personalize.method='none'",
        ],
    )
    comparison = compare(config, seeds=1).comparison
    local, central = comparison.run("local", 0), comparison.run("centralized", 0)
    assert local.steps == central.steps == 2 * 3
    assert local.per_client_loss == central.per_client_loss
    assert local.loss == pytest.approx(central.loss, rel=1e-12)
    assert comparison.arms == ("base", "local", "centralized", "federated")
