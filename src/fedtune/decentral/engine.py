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

from fedtune.aggregate import UpdateStack
from fedtune.decentral.graph import Graph
from fedtune.decentral.mixing import NeighbourRule
from fedtune.decentral.results import DecentralRound, PeerEval
from fedtune.evaluate import combine
from fedtune.round.collect import PlainCollection, train_loss
from fedtune.round.evaluation import evaluate_on
from fedtune.round.messages import FLOAT32_BYTES, TrainRequest, TrainTask
from fedtune.round.plan import Member, RunPlan
from fedtune.round.transport import Exchange, Phase, Purpose, Transport


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
        start, plan = self.clock(), self.plan
        members = [Member(i, i, client_id) for i, client_id in enumerate(plan.population)]
        messages = {
            m.slot: TrainRequest(
                TrainTask(round_num, self.adapters[m.index], clip_l2_norm=None, shared_seed=None), m
            )
            for m in members
        }
        collection = PlainCollection(numel=plan.adapter_numel, weights=plan.weights, linear=False)
        self.transport.open_round(round_num, Purpose.TRAIN, members)
        try:
            done = self.transport.exchange(Exchange(Phase.TRAIN, messages, collection.deliver))
        finally:
            refused = dict(self.transport.close_round())
        stack = collection.updates
        assert isinstance(stack, UpdateStack)  # linear=False keeps every delta, by slot
        trained = {
            slot: self.adapters[slot] + delta
            for slot, delta in zip(stack.positions, stack.deltas, strict=True)
        }
        reports, refusals = collection.accepted, collection.failures
        del stack, collection  # free the N deltas: the trained adapters hold them now
        mixing = self._mix(trained, round_num)
        degrees = self.graph.degrees
        bytes_up = sum(degrees[slot] for slot in trained) * plan.adapter_numel * FLOAT32_BYTES
        evaluation = None
        if round_num % plan.eval_every == 0 or round_num == plan.rounds:
            evaluation, refused_in_eval = self.evaluate(round_num)
            for kind, count in refused_in_eval.items():
                refused[kind] = refused.get(kind, 0) + count
        silent = {m.client_id: "no reply" for m in members if m.slot not in trained}
        failures = silent | {cid: why for cid, why in refusals.values()}
        return DecentralRound(
            round_num=round_num,
            trained=len(trained),
            failures={cid: failures[cid] for cid in plan.population if cid in failures},
            train_loss=train_loss(reports),
            accepted=mixing.accepted,
            rejected=mixing.rejected,
            distance_ratio_median=mixing.distance_ratio_median,
            balance_bound=mixing.bound,
            eval=evaluation,
            bytes_up=bytes_up,
            refused_messages=refused,
            seconds=self.clock() - start,
            train_seconds=done.seconds,
        )

    def _mix(self, trained: dict[int, torch.Tensor], round_num: int) -> _Mixing:
        """Each trained client's new adapter from its own and its trained neighbours'."""
        accepted = rejected = 0
        mixed, relative, bound = list(self.adapters), [], None
        for client, own in sorted(trained.items()):
            peers = [trained[j] for j in self.graph.neighbours[client] if j in trained]
            neighbours = torch.stack(peers) if peers else own.new_zeros((0, own.numel()))
            out = self.rule(own, neighbours, round_num=round_num, rounds=self.plan.rounds)
            mixed[client] = out.flat
            accepted, rejected = accepted + out.accepted, rejected + out.rejected
            if out.relative_distances is not None:
                relative.append(out.relative_distances)
                bound = out.bound
        self.adapters = mixed
        median = None
        if relative and sum(r.numel() for r in relative):
            median = float(torch.nanquantile(torch.cat(relative).double(), 0.5))
        return _Mixing(accepted, rejected, median, bound)

    def evaluate(self, round_num: int) -> tuple[PeerEval | None, dict[str, int]]:
        """Each evaluating client's own adapter on its own held-out data (None if none answered), and
        the messages the transport refused meanwhile."""
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
