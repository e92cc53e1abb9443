"""Attacks against defenses on the default model: the clean eval loss each attack costs, and a backdoor's
success, for every attack x every `server.rule` at 10% and 20% attackers, plus no attack.

The job: SmolLM2-135M with `make run`'s LoRA (r=8 on the attention projections), Shakespeare characters,
20 clients, 5 per round, 12 rounds of 4 local AdamW steps (batch 4, 32 tokens: the CPU budget of a
135-cell matrix), evaluated before and after; worker processes. Each cell is one `simulate` call and
writes `bench/results/attacks/<fraction>-<attack>-<rule>.json` as soon as it ends, so an interrupted
sweep resumes where it stopped (cells on disk are skipped). `--report` turns the cells into the tables
of bench/RESULTS.md and a heat map (`bench/results/attacks-heatmap.png`).

Clean loss change: the honest clients' held-out losses after the last round, averaged over the clients,
against the same clients' in the no-attack run with FedAvg, in percent (`bench/attacks_report.py`).

    .venv/bin/python bench/attacks.py [--fractions 0.2,0.1] [--attacks ...] [--rules ...] [--seed N]
        [--report]

`--seed 1 --attacks none` is the control: the no-attack run again with other cohorts and batches, the
spread a change must exceed to count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

from fedtune.aggregate import ServerConfig
from fedtune.attack.settings import AttackKind

RESULTS = Path("bench/results/attacks")
ATTACKS = list(get_args(AttackKind))  # "none" first
RULES = [r for r in get_args(ServerConfig.model_fields["rule"].annotation) if r != "balance"]
JOB = [
    "model.name=smollm2-135m",
    "data.source=shakespeare",
    "data.seed=0",  # the same clients and held-out examples whatever run.seed (the control varies it)
    "data.max_seq_len=32",
    "train.batch_size=4",
    "federation.num_clients=20",
    "federation.clients_per_round=5",
    "federation.rounds=12",
    "federation.local_steps=4",
    "eval.every=12",
    "server.trim_fraction=0.2",  # one of five per side
    # Krum's f: a cohort of 5 from 20 with 4 attackers has 2 or more in a quarter of the rounds; f = 1
    # let one of them through there (the "-f1" cells in bench/results/attacks)
    "server.byzantine=2",
    "simulation.backend='processes'",
]


# BALANCE's sweep: every client trains every round, so 2 local steps (each client still trains 24 steps in
# 12 rounds, twice a star client's average of 12); a random 4-regular graph; gossip averaging ("fedavg")
# is the undefended side, "balance" the defense. The bound gamma is set from the no-attack run's distances.
STAR_ONLY = ("federation.clients_per_round", "federation.local_steps", "server.trim", "server.byzantine")
DECENTRAL_JOB = [
    *[s for s in JOB if not s.startswith(STAR_ONLY)],
    "federation.local_steps=2",
    "federation.topology='decentralized'",
    "federation.graph='k_regular'",
    "federation.graph_degree=4",
]
DECENTRAL_RULES = ["fedavg", "balance"]


# per attack: ALIE's z_max for 20 clients and 4 attackers is 0.39, which left FedAvg's loss as it was
# (bench/RESULTS.md); the sweep runs it at z = 1.5. The backdoor as plain data poisoning (boost 1) planted
# nothing under FedAvg in 12 rounds (0% greedy success, the "-boost1" cell); scaled by 5 (model
# replacement's boost, Bagdasaryan et al. 2020) it reached 100%, so the sweep tests the defenses on that
EXTRA = {"alie": ["attack.z=1.5"], "backdoor": ["attack.boost=5"]}


@dataclass(frozen=True)
class Variant:
    """What a sweep varies beyond (fraction, attack, rule), and how it names its cells: the run seed
    (controls: "-seed<N>"), the decentralized federation ("dec-"), BALANCE's gamma ("-g<gamma>"), and a
    trial's settings (`--set`, named by `--tag`: "-<tag>")."""

    seed: int = 0
    decentral: bool = False
    gamma: float | None = None
    trial: tuple[str, ...] = ()
    tag: str | None = None

    def job(self) -> list[str]:
        """The job's settings, star or decentralized (with gamma); `run_cell` adds the rule's, the attack's
        and, last so that they may change the attack's, the trial's."""
        if not self.decentral:
            return list(JOB)
        return [*DECENTRAL_JOB, *([] if self.gamma is None else [f"server.balance_gamma={self.gamma}"])]


def cell_name(fraction: float, attack: str, rule: str, variant: Variant = Variant()) -> str:
    v = variant
    attacked = 0 if attack == "none" else round(fraction * 100)
    name = f"{'dec-' if v.decentral else ''}{attacked}-{attack}-{rule}"
    if v.decentral and rule == "balance" and v.gamma is not None:
        name += f"-g{v.gamma}"
    if v.tag:
        name += f"-{v.tag}"
    return name if v.seed == 0 else f"{name}-seed{v.seed}"


def run_cell(fraction: float, attack: str, rule: str, variant: Variant = Variant()) -> dict:
    from fedtune.config import load_config
    from fedtune.decentral import run_decentralized
    from fedtune.simulation import simulate

    name, decentral = cell_name(fraction, attack, rule, variant), variant.decentral
    sets = [*variant.job(), f"server.rule='{rule}'", f"run.dir='bench/out/attacks/{name}'"]
    sets.append(f"run.seed={variant.seed}")
    if attack != "none":
        sets += [f"attack.kind='{attack}'", f"attack.fraction={fraction}", *EXTRA.get(attack, [])]
    sets += variant.trial
    config = load_config(None, sets)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    run_dir = (run_decentralized(config) if decentral else simulate(config)).run_dir
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    clients = json.loads((run_dir / "clients.json").read_text())
    attackers: tuple[str, ...] = ()
    if attack != "none":
        from fedtune.attack import choose_attackers
        from fedtune.simulation.run import load_population

        attackers = choose_attackers(
            config.attack, [c.client_id for c in load_population(config)[2]], config.run.seed
        )
    return {
        "cell": name,
        "settings": sets,
        "fraction": 0.0 if attack == "none" else fraction,
        "attack": attack,
        "rule": rule,
        "seed": variant.seed,
        "rounds": last["round"],
        "eval_loss_before": rows[0]["eval_loss"],
        "eval_loss": last["eval_loss"],
        "honest_eval_loss": last.get("honest_eval_loss", last["eval_loss"]),
        "backdoor_success_before": rows[0].get("backdoor_success"),
        "backdoor_success": last.get("backdoor_success"),
        "backdoor_preference_before": rows[0].get("backdoor_preference"),
        "backdoor_preference": last.get("backdoor_preference"),
        "attackers": list(attackers),
        "attackers_aggregated": sum(r.get("attackers_aggregated") or 0 for r in rows[1:]),
        "topology": "decentralized" if decentral else "star",
        "acceptance_rate": [r.get("acceptance_rate") for r in rows[1:]] if decentral else None,
        "distance_ratio_median": [r.get("distance_ratio_median") for r in rows[1:]] if decentral else None,
        "per_client_after": clients,
        "failed_rounds": sum(r.get("round_failed") is not None for r in rows),
        "failed_clients": sum(len(r.get("failed_clients") or ()) for r in rows),
        "seconds": seconds,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def source_commit() -> str | None:
    """The commit of fedtune's source the cell ran (with "+changes" when src/ differs from it): a cell is
    comparable with another only when the code that made them trains and attacks alike."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        return head + ("+changes" if git("status", "--porcelain", "--", "src").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def sweep(fractions: list[float], attacks: list[str], rules: list[str], variant: Variant = Variant()) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = [(0.0, "none", r) for r in rules if "none" in attacks]
    cells += [(f, a, r) for f in fractions for a in attacks if a != "none" for r in rules]
    for fraction, attack, rule in cells:
        path = RESULTS / f"{cell_name(fraction, attack, rule, variant)}.json"
        if path.exists():
            continue
        out = run_cell(fraction, attack, rule, variant)
        out["source"] = source_commit()
        out["machine"] = (
            f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"
        )
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(
            f"{out['cell']}: eval {out['eval_loss']:.4f} honest {out['honest_eval_loss']:.4f} "
            f"backdoor {out['backdoor_success']} {out['seconds']:.0f}s load {out['load_before']:.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", default="0.2,0.1")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rules", default=None, help="default: every star rule, or fedavg,balance")
    parser.add_argument(
        "--decentralized", action="store_true", help="BALANCE's sweep: a decentralized federation"
    )
    parser.add_argument("--gamma", type=float, default=None, help="server.balance_gamma (decentralized)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed (0: the matrix; others: controls)")
    parser.add_argument("--set", action="append", default=[], help="a setting more (a trial; needs --tag)")
    parser.add_argument("--tag", default=None, help="names the --set trial's cells")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        from attacks_report import report  # bench/attacks_report.py, beside this script

        report(RESULTS, args.gamma)
        return
    torch.set_num_threads(1)
    fractions = [float(f) for f in args.fractions.split(",")]
    rules = args.rules or ",".join(DECENTRAL_RULES if args.decentralized else RULES)
    if bool(args.set) != bool(args.tag):
        parser.error("--set and --tag go together: a trial's cells are named by its tag")
    variant = Variant(args.seed, args.decentralized, args.gamma, tuple(args.set), args.tag)
    sweep(fractions, args.attacks.split(","), rules.split(","), variant)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
