"""Why FLTrust loses more than FedAvg when a fifth of the updates carry nothing (bench/RESULTS.md, "Poisoned
clients"): rerun an attack sweep cell with FLTrust's rule wrapped to log, per round, each update's trust
score (ReLU of its cosine to the server's root update), its norm and the root update's norm, and the
norm of the aggregate it returns.

    .venv/bin/python bench/fltrust_trust.py [--attack sign_flip] [--fraction 0.2]

Writes bench/results/fltrust-trust-<attack>.json (one row per round). Same job and seeds as the sweep's
cell, so its losses repeat that cell's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", default="sign_flip")
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from bench import attacks
    from fedtune.aggregate import robust

    rounds: list[dict] = []
    honest_rule = robust.fltrust

    def logged(deltas: torch.Tensor, weights: torch.Tensor, *, reference: torch.Tensor) -> torch.Tensor:
        ref = reference.to(deltas.dtype)
        norms = torch.linalg.vector_norm(deltas, dim=1)
        cosines = (deltas @ ref) / (norms.clamp_min(1e-30) * torch.linalg.vector_norm(ref).clamp_min(1e-30))
        out = honest_rule(deltas, weights, reference=reference)
        rounds.append(
            {
                "cosine": cosines.tolist(),
                "norm": norms.tolist(),
                "reference_norm": float(torch.linalg.vector_norm(ref)),
                "aggregate_norm": float(torch.linalg.vector_norm(out)),
                "mean_norm": float(torch.linalg.vector_norm(deltas.mean(dim=0))),
            }
        )
        return out

    robust.fltrust = logged  # make_aggregator reads robust.fltrust when the run builds its aggregator
    out = attacks.run_cell(args.fraction, args.attack, "fltrust")
    path = Path(f"bench/results/fltrust-trust-{args.attack}.json")
    path.write_text(
        json.dumps({"cell": out["cell"], "eval_loss": out["eval_loss"], "rounds": rounds}, indent=1)
    )
    print(f"{path}: eval {out['eval_loss']:.4f}")
    for i, r in enumerate(rounds, 1):
        cos = " ".join(f"{c:+.2f}" for c in r["cosine"])
        print(
            f"round {i:>2}: cos {cos}  |ref| {r['reference_norm']:.3f} |agg| {r['aggregate_norm']:.3f} "
            f"|mean| {r['mean_norm']:.3f}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
