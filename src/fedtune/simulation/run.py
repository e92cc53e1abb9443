"""`fedtune run`: a federated run simulated on one machine, with ONE base model in memory.

Setup (data, model, the run's plan) -> loop (the round engine over the in-process transport) -> save
(adapter, per-client evaluation, report). There is no round logic here: sampling, encoding, the secure
sum, privacy, aggregation, the failure policy and the metrics are the engine's (`fedtune.round`), the
same code a deployment runs; only the transport differs. Virtual clients keep no model: each round's
participants borrow the shared model, and what a client keeps between rounds (error-feedback residual,
DP-SGD steps, SCAFFOLD's control, a personal adapter) is in the engine's client-state store, so memory
grows with the population only by that; personal adapters are saved under `personal/` in the run
directory at the last evaluation. With `[clients]` profiles or `federation.round_deadline_s`, the in-process
transport runs under the simulated clock (`round.clock`), each client trains its profile's local steps,
and each round's result carries the clock's timing. With `[simulation] backend = "processes"` or `"ray"`
the clients of a round train several at once in workers (`simulation.workers`), each worker mapping the
same base weights; the engine, and the run's result, are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from fedtune.aggregate import AggregationRule, ServerOptimizer, make_aggregator
from fedtune.audit.results import AuditResult
from fedtune.config import Config, check
from fedtune.config.plan import Resolved, participant_spec, resolve
from fedtune.data import ClientData, load_clients
from fedtune.errors import ConfigError
from fedtune.local import RootUpdate, load_model, root_data, tokenizer_for, torch_threads
from fedtune.model.adapter import save_adapter
from fedtune.round.clock import SimulatedClock
from fedtune.round.engine import RoundEngine
from fedtune.round.inprocess import Dropouts, InProcessTransport, SeededDropouts
from fedtune.round.plan import DpRandomness, Member, ParticipantSpec
from fedtune.round.profiles import spec_for
from fedtune.round.results import EvalSummary, RoundResult
from fedtune.round.state import ClientStateStore
from fedtune.round.transport import Phase
from fedtune.rundir import RunDir, client_changes, summary
from fedtune.seeding import numpy_rng
from fedtune.simulation.attack import AttackMonitor, arm
from fedtune.simulation.audit import AuditMonitor, audit_delta, plant
from fedtune.simulation.workers import ClientFactory, executor_for
from fedtune.train.local import LocalModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Observer(Protocol):
    """Progress hooks; the CLI shows them with rich, tests pass `Silent()`."""

    def start(self, rounds: int, total_steps: int) -> None: ...
    def working(self, round_num: int, client_id: str, phase: Phase) -> None: ...
    def step(self, loss: float) -> None: ...
    def round_finished(self, result: RoundResult) -> None: ...


class Silent:
    def start(self, rounds: int, total_steps: int) -> None: ...
    def working(self, round_num: int, client_id: str, phase: Phase) -> None: ...
    def step(self, loss: float) -> None: ...
    def round_finished(self, result: RoundResult) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    rounds: list[RoundResult]
    before: EvalSummary
    after: EvalSummary
    seconds: float
    num_clients: int
    adapter_numel: int
    notes: list[str] = field(default_factory=list)
    audit: AuditResult | None = None  # with [audit]


def total_steps(config: Config, clients: list[ClientData], cohort: int) -> int:
    """Local steps the whole run takes (for a progress bar)."""
    fed = config.federation
    per_client = fed.local_steps
    if fed.local_epochs is not None:
        mean_train = sum(len(c.train) for c in clients) / len(clients)
        per_client = fed.local_epochs * -(-int(mean_train) // config.train.batch_size)
    return fed.rounds * cohort * per_client


def load_population(
    config: Config, notify: Callable[[str], None] = lambda _msg: None
) -> tuple[Path, PreTrainedTokenizerBase, list[ClientData]]:
    """The base model's directory, its tokenizer and the run's clients (`data.seed`'s), before the model
    loads: bad data is refused first."""
    model_dir, tokenizer = tokenizer_for(config, notify)
    seed = config.data_seed
    rng = numpy_rng(seed, "data")
    return (
        model_dir,
        tokenizer,
        load_clients(config.data, config.federation.num_clients, tokenizer, rng, seed=seed),
    )


def resolve_simulation(
    config: Config,
    clients: list[ClientData],
    local: LocalModel,
    dp_randomness: DpRandomness | None = None,
    evaluators: int | None = None,
) -> Resolved:
    """The run's plan for these clients and this model (`config.plan.resolve` in simulation mode);
    `evaluators`: only the first this many clients evaluate (an audit's canaries come after them)."""
    return resolve(
        config,
        "simulate",
        population=[c.client_id for c in clients],
        adapter_numel=local.adapter.numel,
        layout=local.adapter.layout,
        largest_weight=max(len(c.train) for c in clients),
        dp_randomness=dp_randomness,
        evaluators=evaluators,
    )


@dataclass
class Setup:
    """Everything a simulation builds before round 0: the resolved config, the clients, the one model,
    and the engine over the in-process transport."""

    config: Config
    clients: list[ClientData]
    model_dir: Path
    local: LocalModel
    engine: RoundEngine
    run_dir: RunDir
    states: ClientStateStore  # what the in-process clients keep between rounds
    transport: InProcessTransport
    clock: SimulatedClock | None = None  # with [clients] profiles or federation.round_deadline_s
    attack: AttackMonitor | None = None  # with [attack]
    audit: AuditMonitor | None = None  # with [audit]
    initial: torch.Tensor | None = None  # the global adapter before round 0 (with [audit])

    def close(self) -> None:
        """Stop the pool's workers, if any (the serial executor has none), and close the run directory's
        trackers (a run that did not finish is marked as stopped)."""
        try:
            self.transport.close()
        finally:
            self.run_dir.close()


def setup(
    config: Config,
    observer: Observer,
    notify: Callable[[str], None],
    *,
    rule: AggregationRule | None = None,
    server_opt: ServerOptimizer | None = None,
    dropouts: Dropouts | None = None,
    dp_randomness: DpRandomness | None = None,
    watch: Callable[[Member, object], None] = lambda _member, _reply: None,
) -> Setup:
    """Load the data (bad input is refused before the model loads), the model, resolve the run's plan,
    and build the engine over the executor `[simulation]` names; writes the run directory's config.toml
    and opens its trackers.
    `watch(member, reply)` sees each client's replies (`fedtune compare` counts the steps each trains).
    A pool's workers run until `Setup.close`."""
    if config.federation.topology != "star":
        raise ConfigError(
            "the simulation's round engine runs a star (a server and a global adapter); federation.topology "
            "= 'decentralized' runs with fedtune.decentral.run_decentralized, which `fedtune run` picks, and "
            "`fedtune compare` compares star federations only: set federation.topology = 'star' here"
        )
    seed = config.run.seed
    model_dir, tokenizer, clients = load_population(config, notify)
    planted = plant(config, clients, tokenizer, notify)  # canaries join the population after the real clients
    population = clients if planted is None else planted.clients
    # what `resolve` checks, before the model loads (a tracker's missing package is refused here)
    check(config, "simulate", population=len(population), max_weight=max(len(c.train) for c in population))
    local = load_model(config, model_dir, tokenizer.pad_token_id)
    real = len(clients)
    resolved = resolve_simulation(config, population, local, dp_randomness, evaluators=real)
    clients = population[:real]
    config = resolved.config
    for note in resolved.notes:
        notify(note)
    run_dir = RunDir(config.run.resolved_dir)

    states, spec, profiles = ClientStateStore(), participant_spec(config), resolved.profiles
    shares = None if resolved.dp_randomness is None else resolved.dp_randomness.shares
    distributed = config.privacy.mode == "distributed"
    if distributed and dp_randomness is not None and config.simulation.backend != "serial":
        raise ValueError(  # workers draw their shares from the OS: the given generator would go unused
            "a given dp_randomness with privacy.mode = 'distributed' needs simulation.backend = 'serial'"
        )
    reference = None
    if config.server.rule == "fltrust" and rule is None:  # from the clients' clean data, before poisoning
        reference = RootUpdate.over(config, local, root_data(config, tokenizer, clients))
    armed = arm(config, clients, tokenizer, cohort=resolved.plan.cohort)
    if armed is not None:
        clients = armed.clients
    clients = [*clients, *population[real:]]
    plan = None if armed is None else armed.plan
    canaries = None if planted is None else planted.monitor.canaries
    factory = ClientFactory.over(config, local, model_dir, run_dir.personal_root, shares, plan, canaries)

    def client_for(member: Member) -> tuple[ClientData, ParticipantSpec]:
        return clients[member.index], spec_for(spec, profiles[member.client_id])

    executor = executor_for(config, factory, client_for, states, on_step=observer.step, notify=notify)
    rate = config.secure_aggregation.dropout_rate
    transport = InProcessTransport(
        executor=executor,
        dropouts=dropouts if dropouts is not None else SeededDropouts(rate, seed) if rate > 0 else None,
        on_work=observer.working,
        watch=watch,
    )
    clock = None
    deadline = config.federation.round_deadline_s
    if config.clients.active or deadline is not None:
        batch = config.train.batch_size
        clock = SimulatedClock(transport, profiles, batch_size=batch, seed=seed, deadline_s=deadline)
    engine = RoundEngine(
        resolved.plan,
        transport if clock is None else clock,
        make_aggregator(
            config.server,
            layout=local.adapter.layout,
            rule=rule,
            server_opt=server_opt,
            reference=reference,
        ),
        local.adapter.get(),
        dp=resolved.dp,
        dp_randomness=resolved.dp_randomness,
        notify=notify,
    )
    monitor = None if armed is None else armed.monitor
    audit = None if planted is None else planted.monitor
    initial = None if planted is None else engine.global_flat.clone()
    try:
        run_dir.create(config)  # last: the trackers it opens are closed by Setup.close
    except BaseException:
        transport.close()  # a tracker that cannot open: the pool's workers stop
        raise
    return Setup(
        config, clients, model_dir, local, engine, run_dir, states, transport, clock, monitor, audit, initial
    )


def simulate(
    config: Config,
    observer: Observer | None = None,
    notify: Callable[[str], None] = lambda _msg: None,
    *,
    rule: AggregationRule | None = None,
    server_opt: ServerOptimizer | None = None,
    dropouts: Dropouts | None = None,
    dp_randomness: DpRandomness | None = None,
) -> RunResult:
    """Run one federated fine-tuning job in simulation and write its run directory.

    `rule` and `server_opt` replace `[server]`'s (a user's own aggregation, see `AggregationRule`);
    `dropouts` replaces the seeded secure-aggregation dropouts; `dp_randomness` the OS generators of
    client-level DP (tests only: a seeded one breaks the guarantee)."""
    with torch_threads(config.run.threads):
        started = time.perf_counter()
        observer = observer or Silent()
        s = setup(
            config,
            observer,
            notify,
            rule=rule,
            server_opt=server_opt,
            dropouts=dropouts,
            dp_randomness=dp_randomness,
        )
        try:
            return run_setup(s, observer, started)
        finally:
            s.close()


def run_setup(s: Setup, observer: Observer, started: float) -> RunResult:
    """The rounds of a set-up simulation, then what it ends with: the adapter, clients.json, the report
    (`started`: when the run began, by `time.perf_counter`, for its wall time)."""
    plan, numel = s.engine.plan, s.local.adapter.numel
    observer.start(plan.rounds, total_steps(s.config, s.clients, plan.cohort))
    results: list[RoundResult] = []
    for result in s.engine.run():
        if s.clock is not None:
            result = replace(result, timing=s.clock.timing(result.round_num))
        if s.attack is not None:
            result = s.attack.observe(result, s.local, s.engine.global_flat)
        results.append(result)
        s.run_dir.append(result)
        observer.round_finished(result)

    save_adapter(s.local.model, s.local.adapter, s.engine.global_flat, s.run_dir.adapter_dir, s.model_dir)
    evaluated = [r.eval for r in results if r.eval is not None]
    seconds = time.perf_counter() - started
    settings = summary(
        s.config, num_clients=len(s.clients), cohort=plan.cohort, adapter_numel=numel, seconds=seconds
    )
    title = f"fedtune run `{s.config.run.name}`"
    s.run_dir.finish(client_changes(evaluated[0], evaluated[-1]), title=title, settings=settings)
    audit = None
    if s.audit is not None and s.initial is not None:
        privacy = next((r.privacy for r in reversed(results) if r.privacy is not None), None)
        delta = audit_delta(s.config, len(s.clients))
        audit = s.audit.finish(s.local, s.initial, s.engine.global_flat, privacy=privacy, delta=delta)
        s.run_dir.write_audit(audit.to_json(), audit.lines())
    return RunResult(
        run_dir=s.run_dir.path,
        rounds=results,
        before=evaluated[0],
        after=evaluated[-1],
        seconds=seconds,
        num_clients=len(s.clients),
        adapter_numel=numel,
        notes=s.engine.notes,
        audit=audit,
    )
