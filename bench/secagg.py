"""Secure aggregation cost per round, next to plain FedAvg of the same vectors in the same run.

For each number of clients n and parameters m: n float32 vectors and integer weights (1..256), then
  a) plain FedAvg: each client serializes its float32 vector (`tobytes`), the server reads it back and
     accumulates the weighted sum in float64, as fedtune's streaming aggregator does, then divides;
  b) SecAgg+ through `run_secagg_round` (k = 2 * ceil(log2 n) neighbours unless --all-pairs, no dropouts).
Each is timed `--repeats` times, alternately, and the fastest repeat is kept. Two notions of time:
  total          all clients' work summed + the server's (what one machine simulating the round spends);
  critical path  stage by stage, the slowest client + the server (what a deployment with clients working
                 in parallel waits for, transport aside); for plain FedAvg, one client's serialization
                 + the server.
Upload is the wire size of every message a client sends (`nbytes()`), next to a 32-bit payload (4m bytes).

    .venv/bin/python bench/secagg.py                             # n in {10, 50, 100} x m in {1e5, 1e6}
    .venv/bin/python bench/secagg.py --clients 10 --params 100000 --repeats 1   # quick look
    .venv/bin/python bench/secagg.py --clients 50 --params 1000000 --all-pairs  # also k = n - 1

Writes bench/out/secagg.json (or --out) with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import cryptography
import numpy as np

from fedtune.secagg import default_neighbours, run_secagg_round

MAX_WEIGHT = 256
CLIP_RANGE = 0.1


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
    }


def plain_fedavg(vectors: list[np.ndarray], weights: list[int]) -> tuple[np.ndarray, list[float], float]:
    """(mean, per-client seconds, server seconds) for plain FedAvg of float32 vectors."""
    client_seconds = []
    payloads = []
    for v in vectors:
        start = time.perf_counter()
        payloads.append(v.astype("<f4", copy=False).tobytes())
        client_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    total = np.zeros(vectors[0].shape[0], dtype=np.float64)
    scaled = np.empty_like(total)
    for payload, w in zip(payloads, weights, strict=True):
        np.multiply(np.frombuffer(payload, dtype="<f4"), float(w), out=scaled)
        total += scaled
    mean = (total / sum(weights)).astype(np.float32)
    return mean, client_seconds, time.perf_counter() - start


def measure(n: int, m: int, neighbours: int, bits: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    vectors = [rng.normal(0.0, 0.01, m).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, MAX_WEIGHT + 1, n)]
    best_plain: tuple | None = None
    best_secagg = None
    for _ in range(repeats):
        mean, plain_clients, plain_server = plain_fedavg(vectors, weights)
        if best_plain is None or sum(plain_clients) + plain_server < sum(best_plain[1]) + best_plain[2]:
            best_plain = (mean, plain_clients, plain_server)
        result = run_secagg_round(
            vectors,
            weights,
            bits=bits,
            clip_range=CLIP_RANGE,
            rounding_rng=rng,
            neighbours=neighbours,
            max_weight=MAX_WEIGHT,
        )
        total = sum(result.client_seconds) + result.server_seconds
        if best_secagg is None or total < sum(best_secagg.client_seconds) + best_secagg.server_seconds:
            best_secagg = result
    assert best_plain is not None and best_secagg is not None
    plain_mean, plain_clients, plain_server = best_plain
    r = best_secagg
    step = 2 * CLIP_RANGE / (2**bits - 1)
    secagg_total = sum(r.client_seconds) + r.server_seconds
    plain_total = sum(plain_clients) + plain_server
    plain_critical = max(plain_clients) + plain_server
    upload = sum(r.bytes_up) / n
    return {
        "clients": n,
        "params": m,
        "neighbours": r.neighbours,
        "threshold": r.threshold,
        "bits": bits,
        "secagg_client_seconds_total": sum(r.client_seconds),
        "secagg_client_seconds_per_client": sum(r.client_seconds) / n,
        "secagg_client_seconds_max": max(r.client_seconds),
        "secagg_server_seconds": r.server_seconds,
        "secagg_total_seconds": secagg_total,
        "secagg_critical_path_seconds": r.critical_path_seconds,
        "plain_client_seconds_total": sum(plain_clients),
        "plain_server_seconds": plain_server,
        "plain_total_seconds": plain_total,
        "plain_critical_path_seconds": plain_critical,
        "ratio_total": secagg_total / plain_total,
        "ratio_critical_path": r.critical_path_seconds / plain_critical,
        "ratio_server": r.server_seconds / plain_server,
        "upload_bytes_per_client": upload,
        "download_bytes_per_client": sum(r.bytes_down) / n,
        "upload_vs_32bit_payload": upload / (4 * m),
        "max_error_in_steps": float(np.abs(r.weighted_mean - plain_mean).max() / step),
    }


COLUMNS = [
    ("n", "clients", "{:d}"),
    ("m", "params", "{:.0e}"),
    ("k", "neighbours", "{:d}"),
    ("t", "threshold", "{:d}"),
    ("client s total", "secagg_client_seconds_total", "{:.3f}"),
    ("per client", "secagg_client_seconds_per_client", "{:.4f}"),
    ("server s", "secagg_server_seconds", "{:.3f}"),
    ("critical s", "secagg_critical_path_seconds", "{:.3f}"),
    ("FedAvg s total", "plain_total_seconds", "{:.3f}"),
    ("FedAvg server", "plain_server_seconds", "{:.3f}"),
    ("x total", "ratio_total", "{:.1f}"),
    ("x critical", "ratio_critical_path", "{:.2f}"),
    ("x server", "ratio_server", "{:.2f}"),
    ("up B/client", "upload_bytes_per_client", "{:,.0f}"),
    ("up / 4m", "upload_vs_32bit_payload", "{:.4f}"),
    ("err/step", "max_error_in_steps", "{:.2f}"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--all-pairs", action="store_true", help="also run k = n - 1 (original SecAgg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "secagg.json")
    args = parser.parse_args()

    info = machine()
    print(f"{info['cpu']}, {info['cpus']} CPUs, load {info['load_average_at_start'][0]:.2f}")
    rows = []
    for m in args.params:
        for n in args.clients:
            ks = [default_neighbours(n)] + (
                [n - 1] if args.all_pairs and default_neighbours(n) < n - 1 else []
            )
            for k in ks:
                row = measure(n, m, k, args.bits, args.repeats, args.seed)
                rows.append(row)
                print(
                    f"n={n} m={m:.0e} k={row['neighbours']}: secagg {row['secagg_total_seconds']:.3f} s "
                    f"total, {row['secagg_critical_path_seconds']:.3f} s critical path; "
                    f"FedAvg {row['plain_total_seconds']:.3f} s",
                    flush=True,
                )
    print()
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {"bits": args.bits, "clip_range": CLIP_RANGE, "max_weight": MAX_WEIGHT, "repeats": args.repeats}
    args.out.write_text(json.dumps({"machine": info, "config": config, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
