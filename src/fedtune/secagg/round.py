"""One secure aggregation round in process: the server and n clients exchange the protocol's messages.

`run_secagg_round` is what the simulation engine calls each round, in place of the plain weighted mean.
The caller decides who drops at which stage (`dropouts`), so a seeded simulation is reproducible; a
client that drops sends nothing from that stage on. The weighted mean is over the clients whose masked
input reached the server (U2). Times are measured per party and stage: `client_seconds` sums all clients'
work (what one machine simulating them spends), `critical_path_seconds` adds, stage by stage, the slowest
client and the server (what a deployment with clients in parallel would wait for, transport aside).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.secagg.client import SecAggClient
from fedtune.secagg.encoding import FixedPoint, UniformSource, decode, encode
from fedtune.secagg.graph import default_neighbours, effective_neighbours
from fedtune.secagg.messages import Stage
from fedtune.secagg.params import SecAggParams, default_threshold
from fedtune.secagg.server import SecAggServer


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
        """The round's `secagg_*` entries for metrics.jsonl."""
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


class _Clock:
    """Seconds per (party, stage); party -1 is the server."""

    def __init__(self, n: int) -> None:
        self.client = np.zeros((n, len(Stage)))
        self.server = np.zeros(len(Stage))

    def critical_path(self) -> float:
        return float(self.client.max(axis=0).sum() + self.server.sum())


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

    `neighbours` defaults to 2 * ceil(log2 n) (n - 1 gives the original all-pairs SecAgg), `threshold`
    to a strict majority of each client's k + 1 share holders, `max_weight` (the public bound on any
    weight, used by the overflow check) to max(weights). `dropouts[stage]` are the client indices that
    drop at that stage. Raises `SecAggAbort` when too few clients survive, `ConfigError` when the
    encoding could overflow.
    """
    n = len(vectors)
    if n < 2 or len(weights) != n:
        raise ValueError("secure aggregation needs at least two clients and one weight per vector")
    m = int(np.asarray(vectors[0]).shape[0])
    k = default_neighbours(n) if neighbours is None else neighbours
    t = default_threshold(effective_neighbours(k, n)) if threshold is None else threshold
    spec = FixedPoint(bits, clip_range, int(max(weights) if max_weight is None else max_weight), n)
    params = SecAggParams(round_id, m, t, k, spec)
    dropped_at = {i: Stage(s) for s, ids in (dropouts or {}).items() for i in ids}

    def alive(i: int, stage: Stage) -> bool:
        return dropped_at.get(i, len(Stage)) > stage

    up, down = [0] * n, [0] * n
    clock = _Clock(n)

    def timed(i: int, stage: Stage, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        if i < 0:
            clock.server[stage] += time.perf_counter() - start
        else:
            clock.client[i, stage] += time.perf_counter() - start
        return out

    def masked_input(client: SecAggClient, msg: Any, i: int) -> Any:
        payload = encode(np.asarray(vectors[i], dtype=np.float32), weights[i], spec, rounding_rng)
        return client.masked_input(msg, payload)

    server = SecAggServer(params, range(n), graph_seed=graph_seed)
    clients: list[SecAggClient] = []
    for i in range(n):
        start = time.perf_counter()
        clients.append(SecAggClient(params, i))  # key generation is stage 0 work
        clock.client[i, Stage.ADVERTISE_KEYS] += time.perf_counter() - start

    stages = [
        (
            Stage.ADVERTISE_KEYS,
            lambda c, _msg, _i: c.advertise_keys(),
            server.receive_keys,
            server.close_advertise,
        ),
        (
            Stage.SHARE_KEYS,
            lambda c, msg, _i: c.share_keys(msg),
            server.receive_shares,
            server.close_share_keys,
        ),
        (Stage.MASKED_INPUT, masked_input, server.receive_masked_input, server.close_masked_input),
        (Stage.UNMASK, lambda c, msg, _i: c.unmask(msg), server.receive_unmask, None),
    ]
    inbox: dict[int, Any] = {i: None for i in range(n)}
    for stage, client_step, receive, close in stages:
        for i, msg in inbox.items():
            if not alive(i, stage):
                continue
            if msg is not None:
                down[i] += msg.nbytes()
            reply = timed(i, stage, client_step, clients[i], msg, i)
            up[i] += reply.nbytes()
            timed(-1, stage, receive, reply)
            del reply  # a masked input is as large as the update: keep one at a time
        if close is not None:
            inbox = timed(-1, stage, close)
    total = timed(-1, Stage.UNMASK, server.finish)
    decoded = timed(-1, Stage.UNMASK, decode, total.words, spec)
    return SecAggResult(
        weighted_mean=decoded.mean,
        included=total.survivors,
        excluded=total.excluded,
        total_weight=decoded.total_weight,
        clipped_values=decoded.clipped,
        survivors_per_stage=total.survivors_per_stage,
        neighbours=total.neighbours,
        threshold=t,
        bytes_up=tuple(up),
        bytes_down=tuple(down),
        client_seconds=tuple(float(s) for s in clock.client.sum(axis=1)),
        server_seconds=float(clock.server.sum()),
        critical_path_seconds=clock.critical_path(),
    )
