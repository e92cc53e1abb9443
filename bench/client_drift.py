"""FedAvg against FedProx, FFA-LoRA and SCAFFOLD on the default task (16 Shakespeare characters, non-IID
as they are): eval loss per evaluated round, bytes up, wall time, per method and seed, interleaved.

Each arm is a `fedtune run` in a fresh process with the default config plus its overrides; the arms of
one seed run back to back (A B C D, then the next seed), so machine load hits them alike.

    .venv/bin/python bench/client_drift.py [--seeds 0 1] [--threads 2] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "fedavg": [],
    "fedprox mu=0.1": ["train.proximal_mu=0.1"],
    "ffa": ["server.lora_aggregation='ffa'"],
    "scaffold": ["server.control_variates='scaffold'"],
}


def run_arm(name: str, overrides: list[str], seed: int, threads: int, rounds: int, out: Path) -> dict:
    run_dir = out / f"{name.replace(' ', '_').replace('=', '')}-seed{seed}"
    args = [f"run.dir={run_dir}", f"run.seed={seed}", f"run.threads={threads}", f"federation.rounds={rounds}"]
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fedtune", "run", *(f"--set={a}" for a in [*args, *overrides])],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "arm": name,
        "seed": seed,
        "eval_loss": {r["round"]: r["eval_loss"] for r in rows if r["eval_loss"] is not None},
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "wall_seconds": round(wall, 1),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/out/client-drift"))
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        for name, overrides in ARMS.items():
            result = run_arm(name, overrides, seed, args.threads, args.rounds, args.out)
            print(json.dumps(result), flush=True)
            results.append(result)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "results": results}
    (args.out / "client-drift.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
