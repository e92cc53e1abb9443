"""Bytes up per round and final eval loss on the default task, per compression setting (issue 4).

Runs `fedtune run` in-process with the default config plus each setting, in turn, and compares with the
uncompressed run: bytes up per round (the payload lengths the server decoded) and the last eval loss.
Target: >= 8x fewer bytes up with <= 1% relative eval-loss change.

    .venv/bin/python bench/communication.py [--set key=value ...]   # extra overrides for every run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedtune.cli import _quiet_libraries
from fedtune.config import load_config
from fedtune.simulation import simulate

SETTINGS = {
    "none": [],
    "8-bit": ["compression.method='quantize'", "compression.bits=8"],
    "4-bit": ["compression.method='quantize'", "compression.bits=4"],
    "4-bit/1024": ["compression.method='quantize'", "compression.bits=4", "compression.block_size=1024"],
    "top-k 1% (fp16, EF)": ["compression.method='topk'", "compression.fraction=0.01", "compression.bits=16"],
}


def main() -> None:
    extra = [a for a in sys.argv[1:] if a != "--set"]
    _quiet_libraries()
    out = Path("bench/out")
    results = {}
    for name, overrides in SETTINGS.items():
        run_dir = out / f"communication-{name.split()[0].replace('/', '-')}"
        result = simulate(load_config(None, [*overrides, *extra, f"run.dir={run_dir}"]))
        rounds = result.rounds[1:]
        results[name] = {
            "bytes_up_per_round": sum(r.bytes_up for r in rounds) / len(rounds),
            "final_eval_loss": result.after.loss,
            "final_perplexity": result.after.perplexity,
            "seconds": result.seconds,
        }
        print(name, results[name], flush=True)
    base = results["none"]
    print("\n| setting | bytes up / round | reduction | final eval loss | change |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        r["reduction"] = base["bytes_up_per_round"] / r["bytes_up_per_round"]
        r["relative_loss_change"] = r["final_eval_loss"] / base["final_eval_loss"] - 1
        print(
            f"| {name} | {r['bytes_up_per_round']:,.0f} | {r['reduction']:.1f}x | "
            f"{r['final_eval_loss']:.4f} | {r['relative_loss_change'] * 100:+.2f}% |"
        )
    (out / "communication.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
