"""Learning across unlike clients: aggregation methods and drift corrections on strongly non-IID tasks.
Eval loss per evaluated round, bytes up, wall time, per method and seed, interleaved.

Tasks: `shakespeare` (the default job: 16 characters as they are) and `chat` (chat turns split into 16
clients by a Dirichlet over their senders, alpha 0.1). Arms: the LoRA aggregation methods (separate =
FedAvg, ffa, svd), the drift corrections (FedProx, SCAFFOLD), mixed ranks {4, 8, 16} (flexlora,
hetlora, everyone at rank 4), and mixed local steps {4, 8, 16} (FedAvg, FedNova). Each arm is a
`fedtune run` in a fresh process with the default config plus its overrides; the arms of one seed run
back to back (A B C ..., then the next seed), so machine load hits them alike. Losses and bytes do not depend
on load; wall time does (the load average is written beside it).

    .venv/bin/python bench/client_drift.py [--task shakespeare] [--arms fedavg svd] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = {
    "shakespeare": [],
    "chat": ["data.source='chat'", "data.partition='dirichlet'", "data.dirichlet_alpha=0.1"],
}
# a third of the clients at each rank (seeded, disjoint shares; the rest at lora.rank = 16, the global's)
MIXED_RANKS = """
[lora]
rank = 16
alpha = 32
[[clients.profiles]]
fraction = 0.3333
rank = 4
[[clients.profiles]]
fraction = 0.3333
rank = 8
"""
# a third of the clients take 4 local steps, a third 16, the rest federation.local_steps = 8
MIXED_STEPS = """
[[clients.profiles]]
fraction = 0.3333
local_steps = 4
[[clients.profiles]]
fraction = 0.3333
local_steps = 16
"""
ARMS: dict[str, tuple[list[str], str | None]] = {
    "fedavg": ([], None),
    "ffa": (["server.lora_aggregation='ffa'"], None),
    "svd": (["server.lora_aggregation='svd'"], None),
    "fedprox mu=0.1": (["train.proximal_mu=0.1"], None),
    "scaffold": (["server.control_variates='scaffold'"], None),
    "mixed flexlora": (["server.lora_aggregation='flexlora'"], MIXED_RANKS),
    "mixed hetlora": (["server.lora_aggregation='hetlora'"], MIXED_RANKS),
    "all rank 4": (["lora.rank=4", "lora.alpha=8"], None),
    "steps fedavg": ([], MIXED_STEPS),
    "steps fednova": (["server.step_normalization='fednova'"], MIXED_STEPS),
}


def run_arm(name: str, task: str, seed: int, threads: int, rounds: int, out: Path) -> dict[str, object]:
    overrides, toml = ARMS[name]
    run_dir = out / task / f"{name.replace(' ', '_').replace('=', '')}-seed{seed}"
    args = [f"run.dir={run_dir}", f"run.seed={seed}", f"run.threads={threads}", f"federation.rounds={rounds}"]
    command = [sys.executable, "-m", "fedtune", "run"]
    with tempfile.TemporaryDirectory() as tmp:
        if toml is not None:
            config = Path(tmp) / "config.toml"
            config.write_text(toml)
            command.append(str(config))
        started = time.perf_counter()
        subprocess.run(
            [*command, *(f"--set={a}" for a in [*args, *TASKS[task], *overrides])],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "task": task,
        "arm": name,
        "seed": seed,
        "eval_loss": {r["round"]: r["eval_loss"] for r in rows if r["eval_loss"] is not None},
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "svd_residual": [r.get("svd_residual") for r in rows[1:]],
        "wall_seconds": round(wall, 1),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="shakespeare")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/out/client-drift"))
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        for name in args.arms:
            result = run_arm(name, args.task, seed, args.threads, args.rounds, args.out)
            print(json.dumps(result), flush=True)
            results.append(result)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.task}-{'-'.join(a.split()[0] for a in args.arms)}.json").write_text(
        json.dumps(report, indent=1)
    )


if __name__ == "__main__":
    main()
