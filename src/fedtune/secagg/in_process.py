"""A whole SecAgg+ round in one process, for vectors already in hand: tests and benchmarks.

`run_secagg_round` plays the server (the one stage driver, `stages.SecAggStages`) and every client
(`SecAggClient`) in turn, stage by stage, with the dropouts it is given, and measures each party: a
client's seconds per stage, the server's, and the critical path (stage by stage, the slowest client plus
the server: what a deployment with clients in parallel would wait for, transport aside). The round
engine drives the same `SecAggStages` through a transport instead; this is the shortest way to run the
protocol on its own.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.secagg.client import SecAggClient
from fedtune.secagg.fixedpoint import FixedPoint, UniformSource, decode, encode
from fedtune.secagg.graph import default_neighbours, effective_neighbours
from fedtune.secagg.messages import Stage
from fedtune.secagg.params import SecAggParams, default_threshold
from fedtune.secagg.stages import SecAggStages


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The round's weighted mean and what it cost; per-client tuples are indexed like the inputs."""

    weighted_mean: np.ndarray  # float32, over `included`
    included: tuple[int, ...]
    excluded: tuple[int, ...]  # shared keys, but too few of their neighbours survived to hold their secrets
    total_weight: int
    clipped_values: int  # summed securely: how many values the included clients clipped
    survivors_per_stage: tuple[int, ...]  # advertise keys, share keys, masked input, unmask
    neighbours: int
    threshold: int
    bytes_up: tuple[int, ...]
    bytes_down: tuple[int, ...]
    client_seconds: tuple[float, ...]
    server_seconds: float
    critical_path_seconds: float

    def metrics(self) -> dict[str, Any]:
        """The round's `secagg_*` figures, named as in metrics.jsonl."""
        n = len(self.bytes_up)
        return {
            "secagg_survivors": list(self.survivors_per_stage),
            "secagg_excluded": len(self.excluded),
            "secagg_neighbours": self.neighbours,
            "secagg_threshold": self.threshold,
            "secagg_clipped": self.clipped_values,
            "secagg_bytes_up_per_client": sum(self.bytes_up) / n,
            "secagg_bytes_down_per_client": sum(self.bytes_down) / n,
            "secagg_client_seconds": sum(self.client_seconds),
            "secagg_server_seconds": self.server_seconds,
            "secagg_critical_path_seconds": self.critical_path_seconds,
        }


def run_secagg_round(
    vectors: Sequence[np.ndarray],
    weights: Sequence[int],
    *,
    bits: int,
    clip_range: float,
    rounding_rng: UniformSource,
    threshold: int | None = None,
    neighbours: int | None = None,
    max_weight: int | None = None,
    dropouts: Mapping[Stage | int, Collection[int]] | None = None,
    round_id: int = 0,
    graph_seed: bytes | None = None,
) -> SecAggResult:
    """Securely aggregate `vectors` (float32, one per client) into their mean weighted by `weights`.

    `neighbours` defaults to 2 * ceil(log2 n) (n - 1 is the original all-pairs SecAgg), `threshold` to a
    strict majority of each client's k + 1 share holders, `max_weight` to max(weights); `dropouts[stage]`
    are the clients that drop at that stage (they send nothing from then on). Raises `SecAggAbort` when too
    few clients survive, `ConfigError` when the encoding could overflow or the threshold cannot be met.
    """
    n = len(vectors)
    if len(weights) != n or n < 2:
        raise ValueError("one weight per vector, and at least two vectors")
    k = effective_neighbours(default_neighbours(n) if neighbours is None else neighbours, n)
    t = default_threshold(k) if threshold is None else threshold
    spec = FixedPoint(bits, clip_range, int(max(weights) if max_weight is None else max_weight), n)
    params = SecAggParams(round_id, int(np.asarray(vectors[0]).shape[0]), t, k, spec)
    dropped_at = {i: Stage(s) for s, ids in (dropouts or {}).items() for i in ids}
    seconds = np.zeros((n, len(Stage)))

    def timed(i: int, stage: Stage, work: Any) -> Any:
        start = time.perf_counter()
        out = work()
        seconds[i, stage] += time.perf_counter() - start
        return out

    clients = [timed(i, Stage.ADVERTISE_KEYS, lambda i=i: SecAggClient(params, i)) for i in range(n)]
    stages = SecAggStages(params, range(n), graph_seed=graph_seed)
    respond = {
        Stage.ADVERTISE_KEYS: lambda i, _msg: clients[i].advertise_keys(),
        Stage.SHARE_KEYS: lambda i, msg: clients[i].share_keys(msg),
        Stage.MASKED_INPUT: lambda i, msg: clients[i].masked_input(
            msg, encode(np.asarray(vectors[i], dtype=np.float32), weights[i], spec, rounding_rng)
        ),
        Stage.UNMASK: lambda i, msg: clients[i].unmask(msg),
    }
    for stage in Stage:
        inbox = dict.fromkeys(range(n)) if stage == Stage.ADVERTISE_KEYS else stages.outbox
        for i, msg in inbox.items():
            if dropped_at.get(i, len(Stage)) <= stage:
                continue
            stages.delivered(i)
            step = respond[stage]
            stages.receive(i, timed(i, stage, lambda i=i, msg=msg, step=step: step(i, msg)))
        stages.close_stage()
        if stages.failure is not None:
            raise stages.failure
    total = stages.result
    assert total is not None  # four stages closed without an abort
    decoded = decode(total.words, spec)
    ledger = stages.ledger()
    critical = float(seconds.max(axis=0).sum() + ledger.server_seconds)
    return SecAggResult(
        weighted_mean=decoded.mean,
        included=total.survivors,
        excluded=total.excluded,
        total_weight=decoded.total_weight,
        clipped_values=decoded.clipped,
        survivors_per_stage=total.survivors_per_stage,
        neighbours=total.neighbours,
        threshold=t,
        bytes_up=tuple(ledger.bytes_up[i] for i in range(n)),
        bytes_down=tuple(ledger.bytes_down[i] for i in range(n)),
        client_seconds=tuple(float(s) for s in seconds.sum(axis=1)),
        server_seconds=ledger.server_seconds,
        critical_path_seconds=critical,
    )
