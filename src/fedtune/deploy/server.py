"""`fedtune server`: the coordinator of a deployment, running the round engine over gRPC.

Setup (config, state file, model, the run's plan, the gRPC server with mutual TLS) -> loop (the round
engine over `GrpcTransport`; each round committed to SQLite) -> save (adapter, per-client evaluation,
report; tell the sites the run is done). There is no round logic here: sampling, the secure sum, privacy,
aggregation, the failure policy and the metrics are the engine's, the same code a simulation runs.

Every round is committed in one transaction with its checkpoint (global adapter, server optimizer state,
DP accountant, the largest DP-SGD epsilon reported, SCAFFOLD's server control), so `--resume` after a kill
repeats at most the round in flight and ends with the same adapter as an uninterrupted run.
`metrics.jsonl` is rewritten from the state file on resume, so it never holds a round twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedtune.aggregate import AggregationRule, ServerOptimizer, make_aggregator
from fedtune.checkpoint import Checkpoint
from fedtune.config import Config, check, load_config_text, to_toml
from fedtune.config.plan import resolve
from fedtune.deploy.resume import changes, resumed_config
from fedtune.errors import Refusal, StateError
from fedtune.local import RootUpdate, load_model, root_data, tokenizer_for, torch_threads
from fedtune.model.adapter import save_adapter
from fedtune.round.engine import RoundEngine
from fedtune.round.plan import DpRandomness
from fedtune.round.results import RoundResult
from fedtune.round.transport import Interrupted
from fedtune.rundir import RunDir, summary
from fedtune.store import REFUSED_EVENT_PREFIX, STATE_FILE, Store
from fedtune.transport.channel import grpc_options
from fedtune.transport.coordinator import Coordinator
from fedtune.transport.grpc_transport import GrpcTransport
from fedtune.transport.handshake_log import HandshakeFailure, HandshakeLogTap
from fedtune.transport.service import FederationService
from fedtune.transport.tls import server_credentials, warn_insecure

log = logging.getLogger("fedtune.server")


@dataclass
class ServerResult:
    run_dir: Path
    rounds: list[RoundResult]  # the rounds this process ran (a resumed run's earlier ones are in state.db)
    seconds: float
    adapter_numel: int
    notes: list[str]
    complete: bool  # the run ended (last round, or the privacy budget); False: stopped mid-run


def serve(
    config: Config,
    *,
    resume: bool = False,
    insecure: bool = False,
    notify: Callable[[str], None] = lambda _msg: None,
    on_round: Callable[[RoundResult], None] = lambda _result: None,
    stop: threading.Event | None = None,
    bound_port: list[int] | None = None,
    rule: AggregationRule | None = None,
    server_opt: ServerOptimizer | None = None,
    dp_randomness: DpRandomness | None = None,
    handshakes: HandshakeLogTap | None = None,
) -> ServerResult:
    """Run the federation to its last round (or until `stop` is set) and write the run directory.

    With `resume`, the config and progress come from `run_dir/state.db`; `bound_port`, when given, gets
    the port actually bound (for an address ending in :0). `rule`, `server_opt` and `dp_randomness` are
    as for `fedtune.simulate`. `handshakes`: a tap on gRPC's log (`transport.handshake_log`, started
    before gRPC loaded, as `fedtune server` does) to record refused TLS connections from."""
    started = time.perf_counter()
    check(config, "deploy")  # before anything is written: a refused config leaves no state file
    path = config.run.resolved_dir / STATE_FILE
    if resume and not path.is_file():
        raise StateError(f"--resume: no state in {path}; start the run without --resume")
    store, created = Store(path), not resume
    server = None
    try:
        config = _config_for(config, store, resume)
        with torch_threads(config.run.threads):
            server = _Server(config, store, notify, handshakes)
            return server.run(
                resume=resume,
                insecure=insecure,
                on_round=on_round,
                stop=stop or threading.Event(),
                bound_port=bound_port,
                rule=rule,
                server_opt=server_opt,
                dp_randomness=dp_randomness,
                started=started,
            )
    except BaseException:
        if created and (server is None or not server.serving):
            store.close()
            _remove_state(path)  # a server that never started leaves no state file behind
        raise
    finally:
        if server is not None:
            server.close()
        store.close()


def _remove_state(path: Path) -> None:
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        file.unlink(missing_ok=True)


def _config_for(config: Config, store: Store, resume: bool) -> Config:
    """The run's config: the given one for a new run; to resume, the stored one with the changes a
    resumed run may take (`deploy.resume`), which become the stored config."""
    stored = store.run_config()
    if not resume:
        if stored is not None:
            raise StateError(
                f"{config.run.resolved_dir / STATE_FILE} already holds a run; pass --resume to continue it, "
                "or choose another run.dir"
            )
        return config
    if stored is None:
        raise StateError(
            f"--resume: no state in {config.run.resolved_dir / STATE_FILE}; start the run without --resume"
        )
    saved = load_config_text(stored)
    done = max((r.round_num for r in store.rounds() if r.status in ("done", "failed")), default=0)
    resumed = resumed_config(saved, config, done)
    for change in changes(saved, resumed):
        log.warning("--resume: %s", change)
    store.replace_run_config(to_toml(resumed))
    return resumed


class _Server:
    """One `serve` call's parts: setup -> loop -> save."""

    def __init__(
        self,
        config: Config,
        store: Store,
        notify: Callable[[str], None],
        handshakes: HandshakeLogTap | None,
    ) -> None:
        self.config = config
        self.store = store
        self.notify = notify
        self.eval_before: dict[str, float] = {}  # each client's held-out loss at round 0
        self.eval_after: dict[str, float] = {}  # and at the latest evaluation
        self.serving = False  # the gRPC server started: from here on the state file is the run's
        self.handshakes = handshakes  # where refused TLS connections are read from, if anywhere
        self.layout_recorded: list[list[object]] = []  # the adapter's layout, as checkpoints record it
        self.run_dir: RunDir | None = None  # from setup on: its trackers are closed by `close`

    def close(self) -> None:
        """Close the run directory's trackers (a run that did not finish is marked as stopped)."""
        if self.run_dir is not None:
            self.run_dir.close()

    def run(
        self,
        *,
        resume: bool,
        insecure: bool,
        on_round: Callable[[RoundResult], None],
        stop: threading.Event,
        bound_port: list[int] | None,
        rule: AggregationRule | None,
        server_opt: ServerOptimizer | None,
        dp_randomness: DpRandomness | None,
        started: float,
    ) -> ServerResult:
        config, store, dep = self.config, self.store, self.config.deploy
        population = sorted(dep.clients)
        model_dir, tokenizer = tokenizer_for(config, self.notify)
        local = load_model(config, model_dir, tokenizer.pad_token_id)
        numel = local.adapter.numel
        checkpoint = store.latest_checkpoint() if resume else None
        resolved = resolve(
            config,
            "deploy",
            population=population,
            adapter_numel=numel,
            layout=local.adapter.layout,
            dp_state=None if checkpoint is None else checkpoint.dp_state,
            dp_randomness=dp_randomness,
        )
        config = resolved.config
        run_dir = self.run_dir = RunDir(config.run.resolved_dir)
        layout = local.adapter.layout
        self.layout_recorded = layout.describe()
        reference = None
        if config.server.rule == "fltrust" and rule is None:
            reference = RootUpdate.over(config, local, root_data(config, tokenizer))
        aggregator = make_aggregator(
            config.server, layout=layout, rule=rule, server_opt=server_opt, reference=reference
        )
        global_flat, first, dpsgd_max, control = local.adapter.get(), 0, None, None
        if not resume:
            store.start_run(to_toml(config))
            run_dir.create(config)
        else:
            rows = [
                r.metrics for r in store.rounds() if r.metrics is not None and r.status in ("done", "failed")
            ]
            run_dir.rewrite(config, rows)
            if checkpoint is not None:
                extra = checkpoint.extra or {}
                differs = layout.mismatch(extra["layout"]) if "layout" in extra else None
                if checkpoint.global_flat.numel() != numel or differs is not None:
                    raise StateError(
                        f"the stored adapter ({checkpoint.global_flat.numel()} values) is not this model's "
                        f"({numel}): {differs or 'a different size'}; resume with the run's [model] and "
                        "[lora] settings, or start a new run.dir"
                    )
                global_flat, first = checkpoint.global_flat, checkpoint.round_num + 1
                control = checkpoint.control if resolved.plan.control is not None else None
                aggregator.server_opt.load_state_dict(checkpoint.optimizer_state)
                dpsgd_max = extra.get("dpsgd_epsilon_max")
                self.eval_before = dict(extra.get("eval_before") or {})
                self.eval_after = dict(extra.get("eval_after") or {})
                self.notify(f"resuming after round {checkpoint.round_num}")

        coordinator = Coordinator(
            population,
            to_toml(config),
            session_timeout_s=dep.session_timeout_s,
            poll_interval_s=dep.poll_interval_s,
            on_event=lambda kind, detail, client: store.record_event(
                f"{REFUSED_EVENT_PREFIX}_{kind}", detail, round_num=current[0], client_id=client
            ),
            on_status=store.set_participant,
        )
        current = [first]

        def opened(round_num: int, clients: list[str]) -> None:
            current[0] = round_num
            store.open_round(round_num, clients)

        chunk_bytes = dep.chunk_kib * 1024
        service = FederationService(
            coordinator,
            adapter_numel=resolved.plan.update_numel,  # an update's values: 2x the adapter's under SCAFFOLD
            max_update_bytes=int(dep.max_update_mib * 2**20),
            chunk_bytes=chunk_bytes,
            insecure=insecure,
            max_concurrent_uploads=dep.max_concurrent_uploads,
        )
        # no bandwidth-delay probing: each stream keeps HTTP/2's fixed 64 KiB window, so uploads waiting
        # for a slot hold 64 KiB each in the transport instead of growing windows of several MiB
        options = [*grpc_options(chunk_bytes), ("grpc.http2.bdp_probe", 0)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)
        server.add_generic_rpc_handlers((service.handler(),))
        if insecure:
            warn_insecure()
            port = server.add_insecure_port(dep.address)
        else:
            port = server.add_secure_port(dep.address, server_credentials(dep.certs))
        if bound_port is not None:
            bound_port.append(port)
        server.start()
        self.serving = True
        if self.handshakes is not None and not insecure:
            self.handshakes.watch(port, lambda failure: _refused_connection(coordinator, failure))
        host = dep.address.rsplit(":", 1)[0]
        self.notify(
            f"serving on {host}:{port} ({'INSECURE' if insecure else 'mutual TLS'}), "
            f"{len(population)} clients"
        )
        transport = GrpcTransport(coordinator, dep, stop=stop, on_open=opened, notify=self.notify)
        engine = RoundEngine(
            resolved.plan,
            transport,
            aggregator,
            global_flat,
            dp=resolved.dp,
            dp_randomness=resolved.dp_randomness,
            dpsgd_epsilon_max=dpsgd_max,
            control=control,
            notify=self.notify,
        )
        results: list[RoundResult] = []
        try:
            try:
                for result in engine.run(first):
                    self._commit(engine, result)
                    results.append(result)
                    run_dir.append(result)
                    on_round(result)
            except Interrupted:
                return ServerResult(
                    run_dir.path, results, time.perf_counter() - started, numel, engine.notes, False
                )
            save_adapter(local.model, local.adapter, engine.global_flat, run_dir.adapter_dir, model_dir)
            self._report(run_dir, resolved.plan.cohort, numel, time.perf_counter() - started)
            coordinator.finish(engine.notes[-1] if engine.notes else "the run is complete")
            _drain(coordinator, dep.poll_interval_s, dep.session_timeout_s)
            return ServerResult(
                run_dir.path, results, time.perf_counter() - started, numel, engine.notes, True
            )
        finally:
            server.stop(grace=1.0)

    def _commit(self, engine: RoundEngine, result: RoundResult) -> None:
        """The round and its checkpoint in one transaction (a failed round's carries the state past it)."""
        state = engine.state(result.round_num)
        if result.eval is not None:
            self.eval_after = dict(result.eval.per_client_loss)
            if result.round_num == 0:
                self.eval_before = dict(self.eval_after)
        extra = {
            "layout": self.layout_recorded,
            "dpsgd_epsilon_max": state.dpsgd_epsilon_max,
            "eval_before": self.eval_before,
            "eval_after": self.eval_after,
        }
        checkpoint = Checkpoint(
            result.round_num,
            state.global_flat,
            state.optimizer_state,
            state.dp_state,
            extra=extra,
            control=state.control,
        )
        if result.round_num == 0:
            self.store.open_round(0, [])
        row = result.to_row()
        if result.failed is not None:
            self.store.fail_round(result.round_num, result.failed, row, checkpoint)
        else:
            self.store.finish_round(result.round_num, row, checkpoint)
        self.store.keep_checkpoints()

    def _report(self, run_dir: RunDir, cohort: int, numel: int, seconds: float) -> None:
        """clients.json and report.md over every round in the state file (a resumed run's too)."""
        settings = summary(
            self.config,
            num_clients=len(self.config.deploy.clients),
            cohort=cohort,
            adapter_numel=numel,
            seconds=seconds,
        )
        changes = {
            cid: {"before": loss, "after": self.eval_after.get(cid, math.nan)}
            for cid, loss in self.eval_before.items()
        }
        run_dir.finish(changes, title=f"fedtune deployment `{self.config.run.name}`", settings=settings)


def _refused_connection(coordinator: Coordinator, failure: HandshakeFailure) -> None:
    log.warning("%s", failure)
    coordinator.refuse(Refusal("tls_handshake", str(failure)), None)


def _drain(coordinator: Coordinator, poll_interval_s: float, session_timeout_s: float) -> None:
    """Give connected clients a few polls to hear that the run is done before the server goes away."""
    end = time.monotonic() + min(session_timeout_s, 3 * poll_interval_s + 1.0)
    while time.monotonic() < end and coordinator.undone_sessions():
        time.sleep(0.05)
