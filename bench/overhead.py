"""Simulation overhead and memory, measured (results go to bench/RESULTS.md by hand, with the machine).

1. Overhead ratio: the same client steps (same clients, same batches in the same order) run
   a) by fedtune: one round of the round engine over the in-process transport (participants: global
      adapter swapped in, local steps, delta read out and encoded; the server: checked, summed streaming,
      FedAvg, server optimizer), and
   b) by a plain PEFT loop: reset the adapter with `set_peft_model_state_dict`, AdamW, forward/backward,
      read the adapter back with `get_peft_model_state_dict`.
   Timed alternately, `--repeats` times each; the ratio uses the fastest repeat of each side.
   Target: fedtune / plain <= 1.05.
2. Peak RSS with 10, 100 and 1,000 simulated clients (chat users), each in a fresh process that runs one
   round in which every client trains one step. Target: peak RSS at 1,000 clients within
   (peak RSS with 1 client + 1,000 x adapter bytes) x 1.1.

    .venv/bin/python bench/overhead.py                 # both parts, SmolLM2-135M
    .venv/bin/python bench/overhead.py --model tiny    # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedtune.aggregate import RunningSum, make_aggregator
from fedtune.config import load_config
from fedtune.data.batching import collate
from fedtune.seeding import derive_seed
from fedtune.simulation import Silent, setup
from fedtune.train.local import batch_schedule

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def overhead(model: str, clients: int, steps: int, repeats: int) -> dict:
    config = load_config(
        None,
        [
            f"model.name={model}",
            f"federation.num_clients={clients}",
            f"federation.clients_per_round={clients}",
            f"federation.local_steps={steps}",
            "federation.rounds=100",
            "eval.every=1000",  # no round is evaluated: a round is training and aggregation only
            "run.dir=bench/out/overhead-run",
        ],
    )
    s = setup(config, Silent(), print)
    adapter, engine = s.local.adapter, s.engine
    global_flat = adapter.get()
    round_num = [1]  # each repeat is the next round, with that round's seeds, on both sides

    def seeds() -> list[int]:
        return [derive_seed(0, "train", round_num[0], i) for i in range(clients)]

    def fedtune_round() -> float:
        engine.global_flat = global_flat
        t = time.perf_counter()
        result = engine.run_round(round_num[0])
        assert result.clients == clients and result.eval is None
        return time.perf_counter() - t

    # The plain loop runs on the same model object through PEFT's own state-dict API, with the same
    # batches (same schedule and collate) and the same optimizer settings.
    peft_model = s.local.model
    pad_id = s.local.pad_id
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    params = [p for p in peft_model.parameters() if p.requires_grad]
    cfg = config.train

    def plain_round() -> float:
        t = time.perf_counter()
        for client, seed in zip(s.clients, seeds(), strict=True):
            set_peft_model_state_dict(peft_model, initial)
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            peft_model.train()
            schedule = batch_schedule(
                len(client.train), cfg.batch_size, torch.Generator().manual_seed(seed), steps=steps
            )
            for indices in schedule:
                batch = collate([client.train[i] for i in indices.tolist()], pad_id)
                loss = peft_model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            peft_model.eval()
            get_peft_model_state_dict(peft_model)
        return time.perf_counter() - t

    fedtune_times, plain_times = [], []
    for r in range(repeats):
        order = (fedtune_round, plain_round) if r % 2 == 0 else (plain_round, fedtune_round)
        for fn in order:
            times = fedtune_times if fn is fedtune_round else plain_times
            times.append(fn())
            print(f"  repeat {r}: {fn.__name__} {times[-1]:.2f}s", flush=True)
        round_num[0] += 1

    # The overhead proper, timed on its own: swap in, read delta out, sum, aggregate.
    aggregator = make_aggregator(config.server)
    t = time.perf_counter()
    running = RunningSum()
    for _ in range(clients):
        adapter.load(global_flat)
        running.add(adapter.buffer - global_flat, 1)
    aggregator.step(global_flat, running.summed(adapter.numel))
    swap_seconds = (time.perf_counter() - t) / clients
    return {
        "model": model,
        "clients": clients,
        "steps_per_client": steps,
        "adapter_params": adapter.numel,
        "fedtune_seconds": fedtune_times,
        "plain_peft_seconds": plain_times,
        "ratio": min(fedtune_times) / min(plain_times),
        "swap_delta_aggregate_seconds_per_client": swap_seconds,
        "step_seconds": min(plain_times) / (clients * steps),
    }


def rss_child(model: str, num_clients: int) -> None:
    """Runs in a fresh process: one round in which every client takes one step; prints JSON."""
    from fedtune.simulation import simulate

    config = load_config(
        None,
        [
            f"model.name={model}",
            "data.source=chat",
            "data.min_examples=2",
            "data.max_seq_len=32",
            f"federation.num_clients={num_clients}",
            f"federation.clients_per_round={num_clients}",
            "federation.rounds=1",
            "federation.local_steps=1",
            "train.batch_size=1",
            "eval.max_clients=1",
            "eval.max_examples_per_client=1",
            f"run.dir=bench/out/rss-{num_clients}",
        ],
    )

    class TrainingRss(Silent):
        """The largest current RSS seen at any local step, i.e. after setup's transient peak."""

        peak = 0.0

        def step(self, loss: float) -> None:
            self.peak = max(self.peak, current_rss_mib())

    observer = TrainingRss()
    result = simulate(config, observer)
    print(
        json.dumps(
            {
                "clients": num_clients,
                "peak_rss_mib": peak_rss_mib(),
                "peak_training_rss_mib": observer.peak,
                "final_rss_mib": current_rss_mib(),
                "adapter_bytes": result.adapter_numel * 4,
                "seconds": result.seconds,
            }
        )
    )


def rss(model: str, sizes: list[int]) -> list[dict]:
    out = []
    for n in [1, *sizes]:
        proc = subprocess.run(
            [sys.executable, __file__, "--model", model, "--rss-child", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  {n:>5} clients: peak RSS {row['peak_rss_mib']:.0f} MiB, during training "
            f"{row['peak_training_rss_mib']:.0f} MiB ({row['seconds']:.0f}s)",
            flush=True,
        )
        out.append(row)
    base = out[0]
    for row in out[1:]:
        budget = (base["peak_rss_mib"] + row["clients"] * row["adapter_bytes"] / 2**20) * 1.1
        row["budget_mib"] = budget
        row["within_budget"] = row["peak_rss_mib"] <= budget
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.rss_child is not None:
        rss_child(args.model, args.rss_child)
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    report: dict = {}
    if not args.skip_overhead:
        report["overhead"] = o = overhead(args.model, args.clients, args.steps, args.repeats)
        print(
            f"overhead ratio fedtune/plain PEFT: {o['ratio']:.3f} (target <= 1.05); "
            f"swap+delta+aggregate {o['swap_delta_aggregate_seconds_per_client'] * 1e3:.2f} ms/client, "
            f"step {o['step_seconds']:.2f}s"
        )
    if not args.skip_rss:
        report["rss"] = rss(args.model, [int(x) for x in args.sizes.split(",")])
    os.makedirs("bench/out", exist_ok=True)
    parts = "-".join(k for k in ("overhead", "rss") if k in report)
    with open(f"bench/out/{parts}-{args.model}.json", "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
