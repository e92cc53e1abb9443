"""The default job's wall time and eval perplexity before/after, as `make run` does it.

Runs `fedtune run` in a fresh process (so model loading is counted), then reads its metrics.jsonl.

    .venv/bin/python bench/default_run.py [--set key=value ...]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    run_dir = Path("bench/out/default-run")
    extra = sys.argv[1:]
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fedtune", "run", "--set", f"run.dir={run_dir}", *extra], check=True
    )
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if r["eval_perplexity"] is not None]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "wall_seconds": wall,
        "rounds": len(rows) - 1,
        "perplexity_before": evaluated[0]["eval_perplexity"],
        "perplexity_after": evaluated[-1]["eval_perplexity"],
        "eval_loss_before": evaluated[0]["eval_loss"],
        "eval_loss_after": evaluated[-1]["eval_loss"],
        "round_seconds": [round(r["seconds"], 1) for r in rows],
        "overrides": extra,
    }
    (run_dir.parent / "default-run.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
