"""`fedtune run` with `federation.topology = "decentralized"`: a federation without a server, simulated.

Setup (data, the communication graph, the model, the run's plan) -> loop (the decentralized engine over
the simulation's in-process transport and executor, the same participants and workers as a star run) ->
save (one adapter, per-client evaluation, report). The graph is drawn from `run.seed` before the model
loads, so a graph that will not come out connected is refused at once; its neighbour lists go to the run
directory's graph.json. The rule is `server.rule`: "fedavg" is gossip averaging, "balance" is BALANCE.

There is no global adapter to save: the run saves, as its `adapter/`, the adapter of the evaluating client
whose own held-out loss is lowest at the end (so `fedtune generate` has one to load; it is chosen on the
held-out data it is scored on), and names that client in the report and the result. clients.json holds
each evaluating client's own loss before and after, as in a star run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from fedtune.aggregate import ServerConfig
from fedtune.config import Config
from fedtune.config.checks import check
from fedtune.config.plan import participant_spec
from fedtune.data import ClientData
from fedtune.decentral.balance import Balance
from fedtune.decentral.engine import DecentralEngine
from fedtune.decentral.graph import Graph, by_client, communication_graph
from fedtune.decentral.mixing import NeighbourRule, gossip_average
from fedtune.decentral.results import DecentralResult, DecentralRound, PeerEval
from fedtune.errors import ConfigError
from fedtune.local import load_model, torch_threads
from fedtune.model.adapter import save_adapter
from fedtune.round.inprocess import InProcessTransport
from fedtune.round.plan import Member, ParticipantSpec
from fedtune.round.state import ClientStateStore
from fedtune.round.transport import Phase
from fedtune.rundir import RunDir, summary
from fedtune.seeding import numpy_rng
from fedtune.simulation import total_steps
from fedtune.simulation.attack import arm
from fedtune.simulation.run import load_population, resolve_simulation
from fedtune.simulation.workers import ClientFactory, executor_for


class Progress(Protocol):
    """Progress hooks (`fedtune.progress.RichObserver` has them); tests pass `Quiet()`."""

    def start(self, rounds: int, total_steps: int) -> None: ...
    def working(self, round_num: int, client_id: str, phase: Phase) -> None: ...
    def step(self, loss: float) -> None: ...


class Quiet:
    def start(self, rounds: int, total_steps: int) -> None: ...
    def working(self, round_num: int, client_id: str, phase: Phase) -> None: ...
    def step(self, loss: float) -> None: ...


def neighbour_rule(server: ServerConfig) -> NeighbourRule:
    """`server.rule` in a decentralized topology: fedavg is gossip averaging, balance is BALANCE."""
    if server.rule == "balance":
        return Balance(server.balance_gamma, server.balance_kappa, server.balance_alpha)
    if server.rule == "fedavg":
        return gossip_average
    raise ConfigError(
        f"server.rule = {server.rule!r} has no decentralized form here; use 'fedavg' (gossip averaging) "
        "or 'balance'"
    )


def draw_graph(config: Config, num_clients: int) -> Graph:
    """The run's communication graph (`federation.graph`), from the run seed."""
    fed = config.federation
    return communication_graph(
        fed.graph,
        num_clients,
        degree=fed.graph_degree,
        edge_probability=fed.graph_edge_probability,
        rng=numpy_rng(config.run.seed, "decentral-graph"),
    )


def _describe_graph(config: Config, graph: Graph) -> str:
    fed, degrees = config.federation, graph.degrees
    shape = {
        "ring": "ring",
        "k_regular": f"random {fed.graph_degree}-regular graph",
        "erdos_renyi": f"Erdos-Renyi graph, p = {fed.graph_edge_probability:g}",
    }[fed.graph]
    return (
        f"decentralized: {shape} over {graph.num_nodes} clients (degree {min(degrees)}-{max(degrees)}, "
        f"{len(graph.edges)} edges)"
    )


def _describe_rule(server: ServerConfig) -> str:
    if server.rule == "balance":
        g, k, a = server.balance_gamma, server.balance_kappa, server.balance_alpha
        return f"BALANCE (gamma {g:g}, kappa {k:g}, alpha {a:g}) at every client"
    return "gossip averaging (own and neighbours, equal weights) at every client"


def run_decentralized(
    config: Config,
    progress: Progress | None = None,
    notify: Callable[[str], None] = lambda _msg: None,
    on_round: Callable[[DecentralRound], None] = lambda _result: None,
) -> DecentralResult:
    """Run one decentralized federation in simulation and write its run directory; `on_round(result)` is
    told of each round as it ends."""
    if config.federation.topology != "decentralized":
        raise ConfigError(
            "run_decentralized runs federation.topology = 'decentralized'; simulate runs a star"
        )
    with torch_threads(config.run.threads):
        started = time.perf_counter()
        progress = progress or Quiet()
        model_dir, tokenizer, clients = load_population(config, notify)
        check(config, "simulate", population=len(clients))  # before the graph is drawn: its size is known
        graph = draw_graph(config, len(clients))
        local = load_model(config, model_dir, tokenizer.pad_token_id)
        resolved = resolve_simulation(config, clients, local)
        config, plan = resolved.config, resolved.plan
        for note in resolved.notes:
            notify(note)
        notify(_describe_graph(config, graph))
        run_dir = RunDir(config.run.resolved_dir)
        run_dir.create(config)
        try:
            run_dir.write_graph(by_client(graph, plan.population))

            states, spec = ClientStateStore(), participant_spec(config)
            armed = arm(config, clients, tokenizer, cohort=len(clients))
            if armed is not None:
                clients = armed.clients
            attack = None if armed is None else armed.plan
            factory = ClientFactory.over(config, local, model_dir, run_dir.personal_root, None, attack)

            def client_for(member: Member) -> tuple[ClientData, ParticipantSpec]:
                return clients[member.index], spec

            executor = executor_for(config, factory, client_for, states, on_step=progress.step, notify=notify)
            transport = InProcessTransport(executor=executor, on_work=progress.working)
            engine = DecentralEngine(
                plan, graph, neighbour_rule(config.server), transport, local.adapter.get(), notify=notify
            )
            progress.start(plan.rounds, total_steps(config, clients, len(clients)))
            results: list[DecentralRound] = []
            try:
                for result in engine.run():
                    if armed is not None:
                        losses = None if result.eval is None else result.eval.per_client_loss
                        adapters = dict(zip(plan.population, engine.adapters, strict=True))
                        result = replace(result, attack=armed.monitor.peers(losses, local, adapters))
                    results.append(result)
                    run_dir.append_row(result.to_row())
                    on_round(result)
            finally:
                transport.close()

            evaluated = [r.eval for r in results if r.eval is not None]
            if not evaluated:
                raise ValueError("no round of the run was evaluated")  # round 0 and the last always are
            before, after = evaluated[0], evaluated[-1]
            best = min(after.per_client_loss, key=lambda cid: (after.per_client_loss[cid], cid))
            index = plan.population.index(best)
            save_adapter(local.model, local.adapter, engine.adapters[index], run_dir.adapter_dir, model_dir)
            seconds = time.perf_counter() - started
            settings = summary(
                config,
                num_clients=len(clients),
                cohort=len(clients),
                adapter_numel=local.adapter.numel,
                seconds=seconds,
            )
            settings["aggregation"] = _describe_rule(config.server)
            settings = {
                "topology": _describe_graph(config, graph),
                **settings,
                "adapter": f"{best}'s own (the lowest final eval loss of {after.clients} clients)",
            }
            run_dir.finish(
                _changes(before, after),
                title=f"fedtune run `{config.run.name}` (decentralized)",
                settings=settings,
            )
            return DecentralResult(
                run_dir=run_dir.path,
                rounds=results,
                before=before,
                after=after,
                seconds=seconds,
                num_clients=len(clients),
                adapter_numel=local.adapter.numel,
                adapter_client=best,
                notes=engine.notes,
            )
        finally:
            run_dir.close()  # a run that stopped before its end: its trackers say so


def _changes(before: PeerEval, after: PeerEval) -> dict[str, dict[str, float]]:
    """Each client evaluated at the start: its own adapter's held-out loss before and after."""
    end = after.per_client_loss
    return {
        cid: {"before": loss, "after": end.get(cid, float("nan"))}
        for cid, loss in before.per_client_loss.items()
    }
