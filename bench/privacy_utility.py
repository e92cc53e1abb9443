"""Privacy-utility on chat users: the same federated run with and without client-level DP (issue 4).

Several hundred simulated clients (chitchat-dataset senders), a fixed cohort per round, central DP-FedAvg
calibrated to (epsilon, delta) over the run; reports the final eval loss of both runs and the noise
multiplier the calibration chose.

    .venv/bin/python bench/privacy_utility.py [--set key=value ...]
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from fedtune.cli import _quiet_libraries
from fedtune.config import load_config
from fedtune.simulation import simulate

TASK = [
    "data.source=chat",
    "data.max_seq_len=32",
    "federation.num_clients=300",
    "federation.clients_per_round=30",
    "federation.rounds=8",
    "federation.local_steps=2",
    "eval.every=4",
    "eval.max_clients=32",
    "eval.max_examples_per_client=4",
]
PRIVATE = [
    "privacy.mode='central'",
    "privacy.target_epsilon=8",
    "privacy.delta=1e-5",
    "privacy.clip_l2_norm=0.05",
]


def main() -> None:
    extra = [a for a in sys.argv[1:] if a != "--set"]
    _quiet_libraries()
    results = {}
    for name, overrides in (("non-private", []), ("DP eps=8", PRIVATE)):
        run_dir = Path("bench/out") / f"privacy-{name.split()[0]}"
        result = simulate(load_config(None, [*TASK, *overrides, *extra, f"run.dir={run_dir}"]))
        resolved = tomllib.loads((run_dir / "config.toml").read_text())
        results[name] = {
            "eval_loss_before": result.before.loss,
            "eval_loss_after": result.after.loss,
            "epsilon": None if result.rounds[-1].privacy is None else result.rounds[-1].privacy.epsilon,
            "noise_multiplier": resolved.get("privacy", {}).get("noise_multiplier"),
            "rounds": len(result.rounds) - 1,
            "seconds": result.seconds,
        }
        print(name, results[name], flush=True)
    Path("bench/out/privacy-utility.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
