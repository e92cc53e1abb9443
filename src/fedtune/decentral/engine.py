"""The decentralized round: every client trains its own adapter, then mixes it with its neighbours'.

There is no server and no global adapter. Each client keeps its own adapter (all start from the initial
one). In round t every client trains from its own: the engine hands the transport an `Exchange` of
`TrainRequest`s whose `TrainTask.global_flat` is that client's adapter, so the participants, the executors
(serial, worker processes, Ray) and anything that wraps a participant's trainer (an attack) run unchanged;
the replies are `Submission`s, decoded and checked by `round.collect.PlainCollection` as a server would
(its stack keeps every delta by slot). A client's trained adapter is its adapter plus its delta; it then
sends it to its neighbours (`graph`) and mixes its own with the ones it received by the `NeighbourRule`
(`mixing.gossip_average` or `balance.Balance`). A client whose training failed (its trainer refused a
non-finite update, its worker died) sits the round out: it keeps its adapter and sends nothing, and its
neighbours mix without it. After every `eval.every` rounds, and after the last, each evaluating client
evaluates its own adapter on its own held-out data (`EvalRequest` with that adapter). Memory holds the N
adapters, and during a round the N deltas and the N trained adapters.

The order is adapt-then-combine: a round trains, then mixes, and the evaluation sees mixed adapters. The
clients are mixed one after another (a Python loop over clients, never over parameters); each client's
rule is vectorized over its neighbours. Everything is seeded as in the star run (a client's batches from
the run seed, its round and its index), so serial and pooled executors give the same adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedtune.decentral.graph import Graph
from fedtune.decentral.mixing import NeighbourRule
from fedtune.decentral.results import DecentralRound, PeerEval
from fedtune.evaluate import combine
from fedtune.round.evaluation import evaluate_on
from fedtune.round.plan import RunPlan
from fedtune.round.transport import Transport


@dataclass(frozen=True)
class _Mixing:
    """A round's mixing, over all clients."""

    accepted: int
    rejected: int
    distance_ratio_median: float | None  # BALANCE: the median ||w_i - w_j|| / ||w_i|| over every pair
    bound: float | None  # BALANCE: the round's bound on that ratio


class DecentralEngine:
    def __init__(
        self,
        plan: RunPlan,
        graph: Graph,
        rule: NeighbourRule,
        transport: Transport,
        initial_flat: torch.Tensor,
        *,
        notify: Callable[[str], None] = lambda _msg: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`plan`: the population, rounds, evaluation clients and weight rule (the cohort is everyone);
        `initial_flat`: the adapter every client starts from."""
        if graph.num_nodes != len(plan.population):
            raise ValueError(f"a graph of {graph.num_nodes} nodes for {len(plan.population)} clients")
        self.plan = plan
        self.graph = graph
        self.rule = rule
        self.transport = transport
        self.adapters: list[torch.Tensor] = [initial_flat] * len(plan.population)  # never changed in place
        self.notify = notify
        self.clock = clock
        self.notes: list[str] = []

    def run(self) -> Iterator[DecentralRound]:
        """Round 0 (the initial adapter evaluated), then rounds 1 to `plan.rounds`."""
        yield self.initial()
        for round_num in range(1, self.plan.rounds + 1):
            yield self.run_round(round_num)

    def initial(self) -> DecentralRound:
        start = self.clock()
        evaluation, refused = self.evaluate(0)
        return DecentralRound(
            round_num=0,
            trained=0,
            failures={},
            train_loss=None,
            accepted=0,
            rejected=0,
            eval=evaluation,
            bytes_up=0,
            refused_messages=refused,
            seconds=self.clock() - start,
            train_seconds=0.0,
        )

    def run_round(self, round_num: int) -> DecentralRound:
        start = self.clock()
        evaluated = evaluate_on(self.transport, self.plan, round_num, lambda m: self.adapters[m.index])
        if not evaluated.any_tokens:
            note = f"round {round_num}: no evaluation client answered; the round is not evaluated"
            self.notes.append(note)
            self.notify(note)
            return None, evaluated.refused
        refused = evaluated.refused
        per_client = combine(evaluated.nll).per_client_loss
        losses = torch.tensor(list(per_client.values()), dtype=torch.float64)
        mean, std = float(losses.mean()), float(losses.std(correction=0))
        return PeerEval(per_client, mean, std, self.clock() - start), refused
