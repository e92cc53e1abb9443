"""The server's cost of each LoRA aggregation on SmolLM2-135M's adapter layout, per round.

The layout is SmolLM2-135M's with LoRA on the attention projections (30 layers x q, k, v, o; q and o
576 -> 576, k and v 576 -> 192), built from names and shapes alone (no model is loaded); the clients'
deltas are random. Times the weighted mean (FedAvg's `separate`), the SVD merge (`svd`, and `flexlora`
with ranks {4, 8, 16} at rank 16) and the rank-weighted mean (`hetlora`), interleaved, median of
`--repeats`, with `torch.set_num_threads(--threads)`.

    .venv/bin/python bench/lora_merge.py [--clients 4 16] [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial

import torch

from fedtune.aggregate.lora_merge import RankWeightedMean, SvdMerge
from fedtune.aggregate.rules import weighted_mean
from fedtune.layout import AdapterLayout

HIDDEN, KV, LAYERS = 576, 192, 30


def smollm2_layout(rank: int) -> AdapterLayout:
    names, shapes = [], []
    for layer in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN)):
            module = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            names += [f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"]
            shapes += [(rank, HIDDEN), (out, rank)]
    return AdapterLayout.of(names, shapes)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = []
    for n in args.clients:
        for rank in (8, 16):
            layout = smollm2_layout(rank)
            x = torch.randn(layout.numel, generator=g) * 0.02
            deltas = torch.randn(n, layout.numel, generator=g) * 0.01
            weights = torch.full((n,), 200.0)
            ranks = [(4, 8, 16)[k % 3] for k in range(n)]
            merge, by_rank = SvdMerge(layout), RankWeightedMean(layout)
            total = weights.double() @ deltas.double()
            arms = {
                "separate (weighted mean)": partial(weighted_mean, deltas, weights),
                "svd": partial(merge, x, deltas, weights),
            }
            if rank == 16:
                arms = {
                    "flexlora, ranks 4/8/16": partial(merge, x, deltas, weights, ranks),
                    "hetlora, ranks 4/8/16": partial(by_rank.mean, total, weights.tolist(), ranks),
                }
            for fn in arms.values():
                fn()  # warm up
            timed: dict[str, list[float]] = {name: [] for name in arms}
            for _ in range(args.repeats):  # interleaved: A B A B
                for name, fn in arms.items():
                    timed[name].append(median_ms(fn, 1))
            for name, values in timed.items():
                row = {
                    "clients": n,
                    "rank": rank,
                    "values": layout.numel,
                    "method": name,
                    "median_ms": round(statistics.median(values), 2),
                    "load_average": os.getloadavg(),
                }
                print(json.dumps(row), flush=True)
                results.append(row)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": args.threads}))


if __name__ == "__main__":
    main()
