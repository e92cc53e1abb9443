"""The verdict of `fedtune compare` on hand-made comparisons with known answers, and its files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.compare.report import write_comparison
from fedtune.compare.results import ArmRun, Comparison
from fedtune.compare.verdict import summarize, verdict_lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENTS = ("a", "b", "c", "d")
TOKENS = {"a": 100, "b": 200, "c": 300, "d": 400}

# Per-client losses, one seed: federated beats local for a and b (c ties, d loses): 2 of 4.
# Personalized beats local for a, b, c (3 of 4), federated for a, c (2 of 4), both for a, c (2 of 4).
LOCAL = {"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0}
FEDERATED = {"a": 1.5, "b": 1.8, "c": 2.0, "d": 2.5}
PERSONAL = {"a": 1.4, "b": 1.9, "c": 1.9, "d": 2.6}


def run(arm: str, seed: int, loss: float, per_client: dict[str, float] | None = None, **kw) -> ArmRun:
    per_client = dict.fromkeys(CLIENTS, loss) if per_client is None else per_client
    fields = {"steps": 10, "examples": 80, "bytes_moved": 2_000_000, "seconds": 1.5} | kw
    return ArmRun(arm=arm, seed=seed, loss=loss, per_client_loss=per_client, **fields)


def comparison(runs: list[ArmRun], personalization: str = "none") -> Comparison:
    arms = tuple(dict.fromkeys(r.arm for r in runs))
    seeds = tuple(dict.fromkeys(r.seed for r in runs))
    budget = {arm: f"{arm}: 10 steps of 8 examples per client" for arm in arms}
    return Comparison("hamlet", arms, seeds, tuple(runs), TOKENS, personalization, budget)


def five_arms(*, federated: float = 2.5, personalized: float = 2.4) -> Comparison:
    """One seed: base 3.0, local 2.8, centralized 2.0, federated 2.5, personalized 2.4."""
    return comparison(
        [
            run("base", 0, 3.0),
            run("local", 0, 2.8, LOCAL),
            run("centralized", 0, 2.0),
            run("federated", 0, federated, FEDERATED, epsilon=4.0),
            run("personalized", 0, personalized, PERSONAL, epsilon=4.0),
        ],
        personalization="finetune",
    )


def test_recovered_is_the_share_of_centralized_gain():
    verdict = summarize(five_arms())
    assert verdict.recovered is not None
    assert verdict.recovered.mean == 0.5  # (3.0 - 2.5) / (3.0 - 2.0), exact in binary
    assert verdict.recovered.std == 0.0
    assert verdict.recovered.per_seed == (0.5,)
    assert [s.arm for s in verdict.stats] == ["base", "local", "centralized", "federated", "personalized"]
    assert verdict.best_arm == "centralized"
    lines = verdict_lines(verdict)
    assert lines[0] == (
        "Federation recovers 50% of centralized's gain in eval loss: base 3.000 → federated 2.500, "
        "centralized 2.000 (1 seed)."
    )


def test_recovered_and_losses_are_per_seed_then_mean_and_sample_std():
    runs = [
        *(run("base", s, 3.0) for s in (0, 1)),
        *(run("centralized", s, 2.0) for s in (0, 1)),
        run("federated", 0, 2.5, steps=10),
        run("federated", 1, 2.0, steps=20),  # recovers 1.0 in seed 1
    ]
    verdict = summarize(comparison(runs))
    assert verdict.recovered is not None
    assert verdict.recovered.per_seed == (0.5, 1.0)
    assert verdict.recovered.mean == pytest.approx(0.75)
    assert verdict.recovered.std == pytest.approx(math.sqrt(0.125))  # ddof=1
    federated = verdict.arm("federated")
    assert federated is not None
    assert federated.loss == pytest.approx(2.25)
    assert federated.loss_std == pytest.approx(math.sqrt(0.125))
    assert federated.perplexity == pytest.approx(math.exp(2.25))
    assert federated.steps == 15
    assert verdict.arm("base").loss_std == 0.0
    assert verdict_lines(verdict)[0].startswith("Federation recovers 75% (± 35%) of centralized's gain")
    assert "(mean of 2 seeds)" in verdict_lines(verdict)[0]


def test_no_recovered_without_a_gain_or_a_centralized_arm():
    worse = summarize(comparison([run("base", 0, 3.0), run("centralized", 0, 3.1), run("federated", 0, 2.9)]))
    assert worse.recovered is None
    assert "there is no gain for federation to recover" in verdict_lines(worse)[0]
    missing = summarize(comparison([run("base", 0, 3.0), run("federated", 0, 2.9)]))
    assert missing.recovered is None
    assert missing.federated_beats_local is None and missing.personalized_beats_local is None
    assert "with no centralized arm, the share" in verdict_lines(missing)[0]
    assert missing.best_arm == "federated"


def test_shares_of_clients_on_four_clients():
    verdict = summarize(five_arms())
    fed, p_local = verdict.federated_beats_local, verdict.personalized_beats_local
    p_fed, p_both = verdict.personalized_beats_federated, verdict.personalized_beats_both
    assert (fed.wins, fed.clients, fed.share) == (2, 4, 0.5)  # c's tie does not count
    assert (p_local.wins, p_local.clients) == (3, 4)
    assert (p_fed.wins, p_fed.clients) == (2, 4)
    assert (p_both.wins, p_both.clients) == (2, 4)
    assert verdict.per_client["d"] == {
        "base": 3.0, "local": 2.0, "centralized": 2.0, "federated": 2.5, "personalized": 2.6,
    }  # fmt: skip
    assert verdict.clients == CLIENTS
    lines = verdict_lines(verdict)
    assert "Federated beats local-only for 2 of 4 clients (50%)." in lines
    assert (
        "Personalized (finetune) beats local-only for 3 of 4 clients (75%), federated for 2 of 4 (50%), "
        "both for 2 of 4 (50%)." in lines
    )


def test_per_client_loss_is_averaged_over_seeds_before_comparing():
    # Seed 0 federated wins for a, seed 1 loses for a; on the mean (1.9 vs 2.0) it wins.
    runs = [
        run("local", 0, 2.0, {"a": 2.0, "b": 2.0}),
        run("local", 1, 2.0, {"a": 2.0, "b": 2.0}),
        run("federated", 0, 2.0, {"a": 1.7, "b": 1.9}),
        run("federated", 1, 2.0, {"a": 2.1, "b": 2.3}),
    ]
    verdict = summarize(comparison(runs))
    assert verdict.per_client["a"]["federated"] == pytest.approx(1.9)
    assert verdict.per_client["b"]["federated"] == pytest.approx(2.1)
    assert (verdict.federated_beats_local.wins, verdict.federated_beats_local.clients) == (1, 2)


def test_simpler_wins_appear_exactly_when_they_should():
    # Federated 2.5 vs centralized 2.0 with one seed (no spread): pooling does better. Local-only is
    # at least as good for 2 of 4 clients, not a majority. Personalized beats federated overall.
    verdict = summarize(five_arms())
    assert len(verdict.simpler_wins) == 1
    assert verdict.simpler_wins[0].startswith("Centralized beats federated by 0.500 in eval loss")
    assert "pooling the data would do better; federation recovers 50% of its gain." in verdict.simpler_wins[0]

    # Federated worse than personalized... the other way round: personalization does not pay.
    verdict = summarize(five_arms(personalized=2.6))
    assert any("personalization does not pay" in s for s in verdict.simpler_wins)

    # Base beats every trained arm.
    runs = [run("base", 0, 1.0), run("local", 0, 2.0, LOCAL), run("federated", 0, 1.5, FEDERATED)]
    verdict = summarize(comparison(runs))
    assert verdict.simpler_wins == (
        "The base model (1.000) beats every trained arm (best: federated, 1.500): fine-tuning does not pay.",
    )

    # Local-only at least as good for 3 of 4 clients: a majority.
    mostly_worse = {"a": 1.5, "b": 2.0, "c": 2.1, "d": 2.5}
    verdict = summarize(comparison([run("local", 0, 2.0, LOCAL), run("federated", 0, 2.0, mostly_worse)]))
    assert verdict.simpler_wins == (
        "For 3 of 4 clients training alone does at least as well: federation does not pay for them.",
    )


def test_no_simpler_arm_wins_within_the_spread():
    # Centralized's 0.4 lead is inside the combined spread (0.707 + 0.141); federated beats local for
    # every client and beats the base model; there is no personalized arm.
    runs = [
        *(run("base", s, 3.0) for s in (0, 1)),
        run("local", 0, 2.8, dict.fromkeys(CLIENTS, 2.8)),
        run("local", 1, 2.8, dict.fromkeys(CLIENTS, 2.8)),
        run("centralized", 0, 2.0),
        run("centralized", 1, 2.2),
        run("federated", 0, 2.0),
        run("federated", 1, 3.0),
    ]
    verdict = summarize(comparison(runs))
    assert verdict.simpler_wins == ()
    assert verdict.personalized_beats_local is None and verdict.personalized_beats_both is None
    assert verdict.federated_beats_local.wins == 4
    assert verdict_lines(verdict)[-1] == "No simpler arm wins."


def strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_files_are_written_and_match_the_verdict(tmp_path: Path):
    comp = five_arms()
    nan_run = run("base", 0, 3.0, {**dict.fromkeys(CLIENTS, 3.0), "e": math.nan})
    comp = Comparison(
        comp.name, comp.arms, comp.seeds, (nan_run, *comp.runs[1:]), {**TOKENS, "e": 50},
        comp.personalization, comp.budget,
    )  # fmt: skip
    verdict = summarize(comp)
    write_comparison(tmp_path / "out", comp, verdict)
    out = tmp_path / "out"
    data = strict_loads((out / "compare.json").read_text(encoding="utf-8"))
    assert data["arms"] == list(comp.arms) and data["seeds"] == [0] and data["tokens"]["e"] == 50
    assert data["budget"] == comp.budget
    assert data["runs"][0]["per_client_loss"]["e"] is None  # NaN written as null
    assert data["verdict"]["recovered"]["mean"] == verdict.recovered.mean
    assert data["verdict"]["federated_beats_local"] == {"wins": 2, "clients": 4, "share": 0.5}
    assert data["verdict"]["best_arm"] == "centralized"
    for written, stats in zip(data["verdict"]["stats"], verdict.stats, strict=True):
        assert written["arm"] == stats.arm and written["loss"] == stats.loss
        assert written["loss_std"] == stats.loss_std and written["epsilon"] == stats.epsilon
    assert data["verdict_lines"] == verdict_lines(verdict)

    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# fedtune compare `hamlet`")
    for line in verdict_lines(verdict):
        assert f"- {line}" in report
    for arm, words in comp.budget.items():
        assert words in report and arm in report
    for cid, tokens in {**TOKENS, "e": 50}.items():
        assert f"| {cid} | {tokens:,} |" in report
    assert "| a | 100 | 3.0000 | 2.0000 | 2.0000 | 1.5000 | 1.4000 | ✓ |" in report
    assert "| d | 400 | 3.0000 | 2.0000 | 2.0000 | 2.5000 | 2.6000 |  |" in report
    assert "| federated | 2.5000 | 12.18 | 10 | 80 | 2.00 | 1.5 | 4.00 |" in report
    assert "![mean eval loss per arm](arms.png)" in report
    for name in ("arms.png", "clients.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


def test_files_with_only_base_and_federated(tmp_path: Path):
    comp = comparison([run("base", s, 3.0) for s in (0, 1)] + [run("federated", s, 2.5) for s in (0, 1)])
    verdict = summarize(comp)
    write_comparison(tmp_path, comp, verdict)
    data = strict_loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    assert data["verdict"]["recovered"] is None and data["verdict"]["personalized_beats_both"] is None
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "federated < local" not in report  # no local-only arm to mark against
    assert "| **federated** | 2.5000 ± 0.0000 |" in report
    assert (tmp_path / "clients.png").read_bytes().startswith(PNG_SIGNATURE)
