"""Serial against parallel simulation on the default model: wall time and the process tree's memory.

The job of the side-by-side Flower measurement (SmolLM2-135M, LoRA r=8 alpha 16 on q_proj and v_proj,
Shakespeare characters with at least 64 speeches, 10 clients, 4 per round, 3 rounds, 5 local AdamW steps,
batch 4, 64 tokens, lr 2e-4, evaluated after the last round; fedtune also evaluates the base model at
round 0), `make run`'s default job (serial against processes: which should be the default), and a
larger one (100 clients, 4 rounds of 16). Sides, interleaved in each repeat:
`serial` (one process, all cores as torch threads: the default), `serial1` (one thread: the reference
the pools must match bit for bit), `processes` (one worker per core, one thread each), `ray` (as many
actors on a local Ray the run starts). Each run is `fedtune run` in a fresh process; a sampler reads the
whole process tree every 0.5 s: PSS (shared pages counted once, over all processes) and the summed RSS.
Each side's final adapter is compared with the first run's of `serial1`: max |difference|.

    .venv/bin/python bench/parallel.py [--job small|default|large|all] [--repeats 2]
        [--sides serial,serial1,processes,ray]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

OUT = Path("bench/out/parallel")
CORES = len(os.sched_getaffinity(0))
JOB = [
    "model.name=smollm2-135m",
    "lora.rank=8",
    "lora.alpha=16",
    "lora.target_modules=['q_proj', 'v_proj']",
    "data.source=shakespeare",
    "data.min_examples=64",
    "data.max_seq_len=64",
    "train.batch_size=4",
    "train.lr=2e-4",
    "federation.local_steps=5",
]
JOBS = {
    "small": [
        *JOB,
        "federation.num_clients=10",
        "federation.clients_per_round=4",
        "federation.rounds=3",
        "eval.every=3",
    ],
    "default": [],  # `make run`'s job: the default config
    "large": [
        *JOB,
        "federation.num_clients=100",
        "federation.clients_per_round=16",
        "federation.rounds=4",
        "eval.every=4",
        "eval.max_clients=20",
    ],
}
ONE_THREAD = "simulation.threads_per_worker=1"
SIDES = {
    "serial": [f"run.threads={CORES}"],
    "serial1": ["run.threads=1"],
    "processes": [
        "simulation.backend=processes",
        f"simulation.workers={CORES}",
        "simulation.threads_per_worker=1",
    ],
    "ray": ["simulation.backend=ray", f"simulation.workers={CORES}", "simulation.threads_per_worker=1"],
}


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory_mb(pids: list[int]) -> tuple[float, float]:
    pss = rss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except OSError:
            continue
    return pss / 1024, rss / 1024


@dataclass
class Run:
    job: str
    side: str
    repeat: int
    wall_s: float
    peak_pss_mb: float
    peak_rss_sum_mb: float
    peak_processes: int
    eval_loss_after: float
    load_before: float
    max_abs_diff_vs_serial1: float | None = None


def run_once(job: str, side: str, repeat: int) -> tuple[Run, dict[str, torch.Tensor]]:
    run_dir = OUT / f"{job}-{side}-{repeat}"
    args = [*JOBS[job], *SIDES[side], f"run.dir={run_dir}", f"run.name={job}-{side}"]
    cmd = [sys.executable, "-m", "fedtune", "run", *(x for a in args for x in ("--set", a))]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"pss": 0.0, "rss": 0.0, "n": 0}

    def sample() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            pss, rss = _memory_mb(pids)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            peak["n"] = max(peak["n"], len(pids))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["eval_loss"] for r in rows if r["eval_loss"] is not None][-1]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return Run(job, side, repeat, wall, peak["pss"], peak["rss"], peak["n"], loss, load), adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default="all", choices=["small", "default", "large", "all"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sides", default="serial,serial1,processes,ray")
    parser.add_argument("--large-repeats", type=int, default=1)
    parser.add_argument("--default-sides", default="serial,processes")
    args = parser.parse_args()
    sides = args.sides.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    jobs = ["small", "default", "large"] if args.job == "all" else [args.job]
    for job in jobs:
        reference: dict[str, torch.Tensor] | None = None
        repeats = args.large_repeats if job == "large" else args.repeats
        for repeat in range(repeats):
            for side in args.default_sides.split(",") if job == "default" else sides:
                if job != "small" and side == "serial1":
                    continue
                try:
                    run, adapter = run_once(job, side, repeat)
                except SystemExit as failed:
                    print(failed, file=sys.stderr, flush=True)
                    continue
                if side == "serial1" and reference is None:
                    reference = adapter
                if reference is not None:
                    run.max_abs_diff_vs_serial1 = max(
                        float((adapter[k] - reference[k]).abs().max()) for k in reference
                    )
                runs.append(run)
                print(json.dumps(asdict(run)), flush=True)
                (OUT / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    summary = {"machine": f"{platform.machine()}, {CORES} cores, torch {torch.__version__}", "jobs": {}}
    for job in jobs:
        mine = [r for r in runs if r.job == job]
        base = [r for r in mine if r.side == "serial"]
        by_side = {}
        serial_wall = statistics.median(r.wall_s for r in base) if base else None
        serial_pss = statistics.median(r.peak_pss_mb for r in base) if base else None
        for side in SIDES:
            these = [r for r in mine if r.side == side]
            if not these:
                continue
            wall = statistics.median(r.wall_s for r in these)
            pss = statistics.median(r.peak_pss_mb for r in these)
            by_side[side] = {
                "median_wall_s": round(wall, 1),
                "median_peak_pss_mb": round(pss, 0),
                "median_peak_rss_sum_mb": round(statistics.median(r.peak_rss_sum_mb for r in these), 0),
                "wall_vs_serial": None if serial_wall is None else round(wall / serial_wall, 3),
                "pss_vs_serial": None if serial_pss is None else round(pss / serial_pss, 3),
                "eval_loss_after": [r.eval_loss_after for r in these],
                "max_abs_diff_vs_serial1": [r.max_abs_diff_vs_serial1 for r in these],
                "load_before": [round(r.load_before, 2) for r in these],
            }
        summary["jobs"][job] = by_side
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
