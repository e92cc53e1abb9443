"""The privacy audit on the default task: the empirical epsilon lower bound of a one-run audit next to the
accountant's epsilon, with DP-FedAvg at epsilon 8 and without DP (bench/RESULTS.md, "Privacy audit").

The job: SmolLM2-135M with `make run`'s LoRA, Shakespeare characters (20 real clients, `data.seed = 0`),
12 rounds of 4 local AdamW steps (batch 4, 32 tokens), evaluated after the last round; worker processes.
The audit adds `--canaries` canary clients (default 200) to the population and samples a quarter of it per
round (`federation.clients_per_round = 55`: about 5 real clients, as the attack sweep's rounds), and 8
canary texts inserted 4 times each into real clients' data or not. DP: `privacy.mode = "central"`,
Poisson sampling, `target_epsilon = 8` at delta 1e-5 (the noise calibrated to spend it in 12 rounds), the
default clip. Without DP the audit's delta is 1e-5 too, and the canaries' norm is the same clip.

    .venv/bin/python bench/audit.py [--arms dp8,off] [--canaries 200]

Writes bench/results/audit-<arm>.json: the audit (audit.json) and the run's seconds and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

JOB = [
    "model.name=smollm2-135m",
    "data.source=shakespeare",
    "data.seed=0",
    "data.max_seq_len=32",
    "train.batch_size=4",
    "federation.num_clients=20",
    "federation.rounds=12",
    "federation.local_steps=4",
    "eval.every=12",
    "simulation.backend='processes'",
    "audit.enabled=true",
]
ARMS = {
    "dp8": [
        "privacy.mode='central'",
        "privacy.sampling='poisson'",
        "privacy.target_epsilon=8.0",
        "privacy.delta=1e-5",
    ],
    "off": ["audit.delta=1e-5"],
}


def run_arm(arm: str, canaries: int) -> dict:
    from fedtune.config import load_config
    from fedtune.simulation import simulate

    population = 20 + canaries
    sets = [
        *JOB,
        *ARMS[arm],
        f"audit.canaries={canaries}",
        f"federation.clients_per_round={population // 4}",
        f"run.dir='bench/out/audit/{arm}'",
    ]
    config = load_config(None, sets)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = simulate(config)
    seconds = time.perf_counter() - started
    audit = json.loads((result.run_dir / "audit.json").read_text())
    return {
        "arm": arm,
        "settings": sets,
        "audit": audit,
        "eval_loss_before": result.before.loss,
        "eval_loss": result.after.loss,
        "seconds": seconds,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", default="dp8,off")
    parser.add_argument("--canaries", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for arm in args.arms.split(","):
        out = run_arm(arm, args.canaries)
        path = Path(f"bench/results/audit-{arm}.json")
        path.write_text(json.dumps(out, indent=1) + "\n")
        a = out["audit"]
        print(
            f"{arm}: lower bound {a['epsilon_lower_bound']:.3f} (pure {a['epsilon_lower_bound_pure']:.3f}), "
            f"accounted {a['accounted_epsilon']}, {a['white_box']['correct']}/{a['white_box']['guesses']} "
            f"right, eval {out['eval_loss']:.4f}, {out['seconds']:.0f}s load {out['load_before']:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
