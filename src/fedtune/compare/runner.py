"""`fedtune compare`: every arm, on the same clients and held-out splits, for several seeds.

For each seed (run.seed, run.seed + 1, ...; `data.seed` held at the config's, so every seed has the same
clients, caps and held-out examples, and only the training's randomness varies):
1. the federated arm is the simulation of the config as given (`simulation.setup` / `run_setup`: the
   round engine, no second loop), with a `StepLedger` on its participants, in
   `compare/seed-<seed>/federated/` (a whole run directory: metrics.jsonl, adapter, report);
2. its round 0 is the base arm (the initial adapter's B is zero: the base model), its last evaluation
   the federated arm, and with `[personalize]` that evaluation's personal adapters the personalized arm;
3. the local-only and centralized arms (`compare.arms`) run on the same loaded model, clients and initial
   adapter, matched to the ledger's steps.
Then the verdict (`compare.verdict`) and the files (`compare.report`) in `compare/`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fedtune.compare.arms import Baseline, centralized_arm, eval_tokens, local_arm
from fedtune.compare.ledger import StepLedger
from fedtune.compare.report import write_comparison
from fedtune.compare.results import ArmRun, Comparison
from fedtune.compare.verdict import Verdict, summarize, verdict_lines
from fedtune.config import Config
from fedtune.errors import ConfigError
from fedtune.local import torch_threads
from fedtune.simulation import Observer, RunResult, Silent, run_setup, setup


@dataclass(frozen=True)
class CompareOutcome:
    folder: Path  # runs/<name>/compare
    comparison: Comparison
    verdict: Verdict
    lines: list[str]  # the verdict in words


def compare(
    config: Config,
    seeds: int = 3,
    notify: Callable[[str], None] = lambda _msg: None,
    observer: Observer | None = None,
) -> CompareOutcome:
    """Run every arm for `seeds` seeds and write `runs/<name>/compare/`; `observer` follows each
    federated run (the CLI's progress bar)."""
    if seeds < 1:
        raise ValueError("compare needs at least one seed")
    if config.attack.active or config.federation.topology != "star":
        raise ConfigError(
            "fedtune compare weighs a star federation of honest clients against local-only and "
            f"centralized training; attack.kind = {config.attack.kind!r} and federation.topology = "
            f"{config.federation.topology!r} ask another question: use fedtune run for them"
        )
    if config.audit.enabled:
        raise ConfigError(
            "fedtune compare with audit.enabled: the audit's canary clients would join every arm's "
            "population; audit the federated run alone (fedtune audit CONFIG) and compare without [audit]"
        )
    folder = config.run.resolved_dir / "compare"
    runs: list[ArmRun] = []
    tokens: dict[str, int] = {}
    budget: dict[str, str] = {}
    with torch_threads(config.run.threads):
        for seed in range(config.run.seed, config.run.seed + seeds):
            seed_runs, tokens, budget = _one_seed(config, seed, folder, notify, observer or Silent())
            runs += seed_runs
    arms = tuple(
        a
        for a in ("base", "local", "centralized", "federated", "personalized")
        if any(r.arm == a for r in runs)
    )
    comparison = Comparison(
        name=config.run.name,
        arms=arms,
        seeds=tuple(range(config.run.seed, config.run.seed + seeds)),
        runs=tuple(runs),
        tokens=tokens,
        personalization=config.personalize.method,
        budget=budget,
    )
    verdict = summarize(comparison)
    write_comparison(folder, comparison, verdict)
    return CompareOutcome(folder, comparison, verdict, verdict_lines(verdict))


def seed_config(config: Config, seed: int, folder: Path) -> Config:
    """The federated arm's config for one seed: run.seed varies, data.seed stays the config's."""
    run = config.run.model_copy(update={"seed": seed, "dir": folder / f"seed-{seed}" / "federated"})
    data = config.data.model_copy(update={"seed": config.data_seed})
    return config.model_copy(update={"run": run, "data": data})


def _one_seed(
    config: Config, seed: int, folder: Path, notify: Callable[[str], None], observer: Observer
) -> tuple[list[ArmRun], dict[str, int], dict[str, str]]:
    cfg, seed_dir = seed_config(config, seed, folder), folder / f"seed-{seed}"
    ledger = StepLedger()
    started = time.perf_counter()
    s = setup(cfg, observer, notify, watch=ledger.watch)
    initial = s.engine.global_flat.clone()
    try:
        result = run_setup(s, observer, started)
    finally:
        s.close()  # the federated arm's workers, if any: the other arms train on this process's model
    plan = s.engine.plan
    b = Baseline(s.config, s.clients, s.local, initial, plan.eval_members, result.before)
    max_examples = s.config.eval.max_examples_per_client
    tokens = {c.client_id: eval_tokens(c, max_examples) for c in (s.clients[i] for i in plan.eval_members)}
    runs = [_base(result, seed), _federated(result, ledger, cfg, seed)]
    notify(f"seed {seed}: federated eval loss {result.before.loss:.4f} -> {result.after.loss:.4f}")
    local = local_arm(b, ledger.steps, seed_dir / "local", seed)
    central = centralized_arm(b, ledger.total_steps, seed_dir / "centralized", seed)
    runs += [
        replace(local, run_dir=f"seed-{seed}/local"),
        replace(central, run_dir=f"seed-{seed}/centralized"),
    ]
    notify(f"seed {seed}: local-only {local.loss:.4f}, centralized {central.loss:.4f}")
    personal = _personalized(result, ledger, cfg, b, seed)
    if personal is not None:
        runs.append(personal)
        notify(f"seed {seed}: personalized ({cfg.personalize.method}) {personal.loss:.4f}")
    return runs, tokens, _budget(cfg, ledger, b, personal)


def _base(result: RunResult, seed: int) -> ArmRun:
    before = result.before
    return ArmRun(
        arm="base",
        seed=seed,
        loss=before.loss,
        per_client_loss=dict(before.per_client_loss),
        steps=0,
        examples=0,
        bytes_moved=0,
        seconds=before.seconds,
        run_dir=f"seed-{seed}/federated",
    )


def _bytes(result: RunResult) -> int:
    return sum(
        r.bytes_up + r.bytes_down + (0 if r.eval is None else r.eval.bytes_down) for r in result.rounds
    )


def _epsilon(result: RunResult) -> float | None:
    spent = [r.privacy.epsilon for r in result.rounds if r.privacy is not None]
    return spent[-1] if spent else None


def _federated(result: RunResult, ledger: StepLedger, cfg: Config, seed: int) -> ArmRun:
    return ArmRun(
        arm="federated",
        seed=seed,
        loss=result.after.loss,
        per_client_loss=dict(result.after.per_client_loss),
        steps=ledger.total_steps,
        examples=ledger.total_steps * cfg.train.batch_size,
        bytes_moved=_bytes(result),
        seconds=result.seconds,
        epsilon=_epsilon(result),
        run_dir=f"seed-{seed}/federated",
    )


def _personal_steps(cfg: Config, ledger: StepLedger, b: Baseline) -> int:
    """The steps personal adapters took beyond the federated run's: finetune's after the last round;
    ditto's along the rounds (one personal pass per training) and for clients that never trained."""
    method, steps = cfg.personalize.method, cfg.personalize.steps
    untrained = sum(1 for cid in b.eval_ids if ledger.steps.get(cid, 0) == 0)
    if method == "finetune":
        return steps * len(b.eval_ids)
    along = ledger.total_steps if method == "ditto" else 0  # split trains B within the same steps
    return along + steps * untrained


def _personalized(
    result: RunResult, ledger: StepLedger, cfg: Config, b: Baseline, seed: int
) -> ArmRun | None:
    personal = result.after.personal
    if personal is None:
        return None
    steps = ledger.total_steps + _personal_steps(cfg, ledger, b)
    return ArmRun(
        arm="personalized",
        seed=seed,
        loss=personal.loss,
        per_client_loss=dict(personal.per_client_loss),
        steps=steps,
        examples=steps * cfg.train.batch_size,
        bytes_moved=_bytes(result),
        seconds=result.seconds,
        epsilon=_epsilon(result),
        run_dir=f"seed-{seed}/federated",
    )


def _budget(cfg: Config, ledger: StepLedger, b: Baseline, personal: ArmRun | None) -> dict[str, str]:
    """Each arm's training budget in words (the last seed's: the cohorts differ by seed)."""
    batch, fed = cfg.train.batch_size, cfg.federation
    total = ledger.total_steps
    per_client = [ledger.steps.get(cid, 0) for cid in b.eval_ids]
    untrained = sum(1 for n in per_client if n == 0)
    work = f"{fed.local_epochs} local epochs" if fed.local_epochs else f"{fed.local_steps} local steps"
    budget = {
        "base": "no training",
        "federated": f"{fed.rounds} rounds, {work} per selected client: {total} steps x batch {batch} = "
        f"{total * batch} examples, by {len(ledger.steps)} clients",
        "local": f"each evaluation client alone for the steps it trained in federation "
        f"({min(per_client)}-{max(per_client)} steps, {sum(per_client)} in all, x batch {batch}); "
        f"{untrained} of {len(per_client)} never trained there and keep the base model",
        "centralized": f"every client's training examples pooled "
        f"({sum(len(c.train) for c in b.clients)} examples of {len(b.clients)} clients): {total} steps "
        f"x batch {batch} = {total * batch} examples, the federated run's",
    }
    if personal is not None:
        extra = personal.steps - total
        budget["personalized"] = (
            f"the federated run, plus {extra} personal-adapter steps ({cfg.personalize.method}, "
            f"personalize.steps = {cfg.personalize.steps})"
        )
    return budget
