"""One secure aggregation round in process: the server and n clients exchange the protocol's messages.

`SecAggRound` runs a round in the order a simulation does: keys are exchanged before training
(`share_keys`, stages 0 and 1), each client's masked input is added to the server's running sum as soon as
that client has trained (`submit`, stage 2: memory stays one update, whatever the number of clients), and
`finish` unmasks (stage 3). A client that never submits, e.g. because its update was refused, is simply a
stage-2 dropout. `run_secagg_round` does all of it for vectors already in hand.

The caller decides who drops at which stage (`dropouts`), so a seeded simulation is reproducible; a client
that drops sends nothing from that stage on. The weighted mean is over the clients whose masked input
reached the server (U2). Times are measured per party and stage: `client_seconds` is each client's work
(their sum is what one machine simulating them spends), `critical_path_seconds` adds, stage by stage, the
slowest client and the server (what a deployment with clients in parallel would wait for, transport aside).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.secagg.client import SecAggClient
from fedtune.secagg.encoding import FixedPoint, UniformSource, decode, encode
from fedtune.secagg.graph import default_neighbours, effective_neighbours
from fedtune.secagg.messages import ForwardedShares, MaskedInput, Stage
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
    decoded: Any = None  # what the decoder returned (the default decode's DecodedSum, or another's)

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


class _Ledger:
    """Seconds per party and stage, and the bytes each client sent and received."""

    def __init__(self, n: int) -> None:
        self.client_seconds = np.zeros((n, len(Stage)))
        self.server_seconds = np.zeros(len(Stage))
        self.up = [0] * n
        self.down = [0] * n

    @contextmanager
    def client(self, i: int, stage: Stage) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.client_seconds[i, stage] += time.perf_counter() - start

    @contextmanager
    def server(self, stage: Stage) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.server_seconds[stage] += time.perf_counter() - start

    def critical_path(self) -> float:
        return float(self.client_seconds.max(axis=0).sum() + self.server_seconds.sum())


class SecAggRound:
    """A round over clients 0..n-1 driven in process: `share_keys`, then `submit` per client, then `finish`.

    `neighbours` defaults to 2 * ceil(log2 n) (n - 1 gives the original all-pairs SecAgg), `threshold`
    to a strict majority of each client's k + 1 share holders; `max_weight` is the public bound on any
    weight, used by the overflow check. `dropouts[stage]` are the clients that drop at that stage. Raises
    `ConfigError` when the encoding could overflow or the threshold cannot be met, and `SecAggAbort` (from
    `share_keys` or `finish`) when too few clients survive.
    """

    def __init__(
        self,
        num_clients: int,
        vector_size: int,
        *,
        bits: int,
        clip_range: float,
        max_weight: int,
        rounding_rng: UniformSource,
        threshold: int | None = None,
        neighbours: int | None = None,
        dropouts: Mapping[Stage | int, Collection[int]] | None = None,
        round_id: int = 0,
        graph_seed: bytes | None = None,
    ) -> None:
        if num_clients < 2:
            raise ValueError("secure aggregation needs at least two clients")
        n = num_clients
        k = effective_neighbours(default_neighbours(n) if neighbours is None else neighbours, n)
        t = default_threshold(k) if threshold is None else threshold
        self.spec = FixedPoint(bits, clip_range, max_weight, n)
        self.params = SecAggParams(round_id, vector_size, t, k, self.spec)
        self._rng = rounding_rng
        self._dropped_at = {i: Stage(s) for s, ids in (dropouts or {}).items() for i in ids}
        self._ledger = _Ledger(n)
        self._server = SecAggServer(self.params, range(n), graph_seed=graph_seed)
        self._clients = []
        for i in range(n):
            with self._ledger.client(i, Stage.ADVERTISE_KEYS):  # key generation is stage 0 work
                self._clients.append(SecAggClient(self.params, i))
        self._forwarded: dict[int, ForwardedShares] = {}

    def _alive(self, i: int, stage: Stage) -> bool:
        return self._dropped_at.get(i, len(Stage)) > stage

    def _exchange(self, stage: Stage, inbox: Mapping[int, Any], step: Callable[[int, Any], Any]) -> None:
        """Each client still alive at `stage` reads its message and sends its reply to the server."""
        receive = {
            Stage.ADVERTISE_KEYS: self._server.receive_keys,
            Stage.SHARE_KEYS: self._server.receive_shares,
            Stage.MASKED_INPUT: self._server.receive_masked_input,
            Stage.UNMASK: self._server.receive_unmask,
        }[stage]
        ledger = self._ledger
        for i, msg in inbox.items():
            if not self._alive(i, stage):
                continue
            ledger.down[i] += 0 if msg is None else msg.nbytes()
            with ledger.client(i, stage):
                reply = step(i, msg)
            ledger.up[i] += reply.nbytes()
            with ledger.server(stage):
                receive(reply)

    def share_keys(self) -> tuple[int, ...]:
        """Stages 0 and 1; returns the clients that may submit (they shared keys and were not left out)."""
        clients, server, ledger = self._clients, self._server, self._ledger
        n = len(clients)
        self._exchange(
            Stage.ADVERTISE_KEYS, dict.fromkeys(range(n)), lambda i, _: clients[i].advertise_keys()
        )
        with ledger.server(Stage.ADVERTISE_KEYS):
            neighbour_keys = server.close_advertise()
        self._exchange(Stage.SHARE_KEYS, neighbour_keys, lambda i, msg: clients[i].share_keys(msg))
        with ledger.server(Stage.SHARE_KEYS):
            self._forwarded = server.close_share_keys()
        return tuple(sorted(self._forwarded))

    def submit(
        self,
        i: int,
        vector: np.ndarray,
        weight: int,
        noise: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> bool:
        """Client i encodes, masks and sends its update; False if it is out of the round or drops now.
        `noise` (distributed DP) adds the client's integer noise share to its encoded payload before
        masking."""
        msg = self._forwarded.pop(i, None)
        if msg is None or not self._alive(i, Stage.MASKED_INPUT):
            return False

        def masked_input(i: int, msg: ForwardedShares) -> MaskedInput:
            payload = encode(np.asarray(vector, dtype=np.float32), weight, self.spec, self._rng)
            if noise is not None:
                payload = noise(payload)
            return self._clients[i].masked_input(msg, payload)

        self._exchange(Stage.MASKED_INPUT, {i: msg}, masked_input)
        return True

    def bytes_so_far(self) -> tuple[int, int]:
        """Bytes all clients have sent and received so far (what an aborted round still cost)."""
        return sum(self._ledger.up), sum(self._ledger.down)

    def finish(self) -> SecAggResult:
        """Stage 3: unmask the sum of the submitted updates and decode their weighted mean."""
        return self.finish_with(decode)

    def finish_with(self, decoder: Callable[[np.ndarray, FixedPoint], Any]) -> SecAggResult:
        """Stage 3 with another decoder of the unmasked words (distributed DP: a centred decode of a noised
        sum); the result's `decoded` is what the decoder returned."""
        server, ledger = self._server, self._ledger
        with ledger.server(Stage.MASKED_INPUT):
            requests = server.close_masked_input()
        self._exchange(Stage.UNMASK, requests, lambda i, msg: self._clients[i].unmask(msg))
        with ledger.server(Stage.UNMASK):
            total = server.finish()
            decoded = decoder(total.words, self.spec)
        if decoder is not decode:
            return self._result(total, decoded, np.zeros(0, np.float32), 0, 0)
        return self._result(total, decoded, decoded.mean, decoded.total_weight, decoded.clipped)

    def _result(
        self, total: Any, decoded: Any, mean: np.ndarray, total_weight: int, clipped: int
    ) -> SecAggResult:
        ledger = self._ledger
        return SecAggResult(
            weighted_mean=mean,
            included=total.survivors,
            excluded=total.excluded,
            total_weight=total_weight,
            clipped_values=clipped,
            survivors_per_stage=total.survivors_per_stage,
            neighbours=total.neighbours,
            threshold=self.params.threshold,
            bytes_up=tuple(ledger.up),
            bytes_down=tuple(ledger.down),
            client_seconds=tuple(float(s) for s in ledger.client_seconds.sum(axis=1)),
            server_seconds=float(ledger.server_seconds.sum()),
            critical_path_seconds=ledger.critical_path(),
            decoded=decoded,
        )


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

    A whole `SecAggRound` at once; `max_weight` defaults to max(weights), the other arguments are its.
    """
    if len(weights) != len(vectors) or not vectors:
        raise ValueError("one weight per vector, and at least one vector")
    round_ = SecAggRound(
        len(vectors),
        int(np.asarray(vectors[0]).shape[0]),
        bits=bits,
        clip_range=clip_range,
        max_weight=int(max(weights) if max_weight is None else max_weight),
        rounding_rng=rounding_rng,
        threshold=threshold,
        neighbours=neighbours,
        dropouts=dropouts,
        round_id=round_id,
        graph_seed=graph_seed,
    )
    for i in round_.share_keys():
        round_.submit(i, vectors[i], weights[i])
    return round_.finish()
