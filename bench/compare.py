"""Does federation pay off? `fedtune compare` on the default task and on 50 chat users, 3 seeds each.

Each task is one `fedtune compare` in a fresh process (every arm of a seed runs back to back, then the
next seed, so machine load hits the arms alike); this script adds the machine, the load average before
and after, and the verdict's numbers to `bench/out/compare-<task>.json`. Losses do not depend on load;
wall times do.

Tasks (SmolLM2-135M, the config's defaults unless named):
- `shakespeare`: the default job, 16 characters, 6 rounds x 4 clients x 8 local steps, with
  `personalize.method = "finetune"` (8 steps);
- `chat`: 50 chat users (`data.source = "chat"`, natural split by user), 6 rounds x 8 clients x 4 local
  steps, 4 held-out examples per client, finetune personalization (4 steps).

    .venv/bin/python bench/compare.py --task shakespeare [--seeds 3] [--threads 2] [--method finetune]
        [--set personalize.lr=5e-4 --tag=-lr5e-4]
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

TASKS = {
    "shakespeare": [],
    "chat": [
        "data.source='chat'",
        "federation.num_clients=50",
        "federation.clients_per_round=8",
        "federation.local_steps=4",
        "eval.max_examples_per_client=4",
        "personalize.steps=4",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=sorted(TASKS), default="shakespeare")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="finetune")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="one more override")
    parser.add_argument("--tag", default="", help="added to the run's and the output's names")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    name = f"bench-compare-{args.task}-{args.method}{args.tag}"
    sets = [*TASKS[args.task], *args.sets, f"run.name='{name}'", f"run.threads={args.threads}"]
    sets.append(f"personalize.method='{args.method}'")
    command = [sys.executable, "-m", "fedtune", "compare", "--seeds", str(args.seeds)]
    for item in sets:
        command += ["--set", item]
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    folder = Path("runs") / name / "compare"
    result = json.loads((folder / "compare.json").read_text())
    record = {
        "task": args.task,
        "method": args.method,
        "overrides": sets,
        "seeds": args.seeds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "threads": args.threads,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": seconds,
        "verdict": result["verdict"],
        "verdict_lines": result["verdict_lines"],
        "budget": result["budget"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compare-{args.task}-{args.method}{args.tag}.json").write_text(json.dumps(record, indent=1))
    print("\n".join(result["verdict_lines"]))


if __name__ == "__main__":
    main()
