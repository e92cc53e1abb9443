"""`fedtune server`: the coordinator of a deployment, running the same rounds as the simulation over gRPC.

Set up (config, model, state file) -> serve (gRPC with mutual TLS) -> rounds (wait for clients, sample,
hand out tasks, collect, aggregate, checkpoint) -> save the adapter. The round's parts are the simulation's:
`sample_clients` with the run's seed, `PlainCollector` into `Aggregator(rule, server_opt)`, client-level DP
through `ClientLevelDp`; clients train with the seeds a simulation would give them. Only the transport
differs.

Every completed round is committed to SQLite in one transaction with its checkpoint (global adapter,
server optimizer state, DP accountant), so `--resume` after a kill repeats at most the round in flight and
ends with the same adapter as an uninterrupted run. `metrics.jsonl` is rewritten from the state file on
resume, so it never holds a round twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from fedtune.adapter import FlatAdapter, attach_lora, save_adapter
from fedtune.aggregate import make_aggregator
from fedtune.collect import Collected, PlainCollector
from fedtune.compress import num_kept, scatter_shared
from fedtune.config import Config, check_deployment, load_config_text, to_toml
from fedtune.deploy.coordinator import Coordinator, RoundOutcome, RoundTask
from fedtune.deploy.secure import SecureRound, secure_params
from fedtune.encoding import ClientEncoding
from fedtune.errors import StateError
from fedtune.models import load_base_model, resolve_model_dir
from fedtune.privacy.clip import clip_l2
from fedtune.privacy.dpfedavg import ClientLevelDp, resolve_client_dp
from fedtune.privacy.noise import os_entropy_rng
from fedtune.rundir import RunDir
from fedtune.sampling import sample_clients
from fedtune.secagg import Stage
from fedtune.seeding import numpy_rng, torch_generator
from fedtune.store import REFUSED_EVENT_PREFIX, Checkpoint, Store
from fedtune.transport.service import FederationService
from fedtune.transport.tls import server_credentials, warn_insecure
from fedtune.transport.wire import UpdateLimits, float32_bytes

log = logging.getLogger("fedtune.server")
STATE_FILE = "state.db"
MESSAGE_OVERHEAD_BYTES = 1 << 16


@dataclass
class ServerResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    seconds: float
    adapter_numel: int
    notes: list[str]


def grpc_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """No single message larger than one chunk and its header: bigger ones are refused by gRPC itself."""
    limit = chunk_bytes + MESSAGE_OVERHEAD_BYTES
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def serve(
    config: Config,
    *,
    resume: bool = False,
    insecure: bool = False,
    notify: Callable[[str], None] = lambda _msg: None,
    on_round: Callable[[dict[str, Any]], None] = lambda _row: None,
    stop: threading.Event | None = None,
    bound_port: list[int] | None = None,
) -> ServerResult:
    """Run the federation to its last round (or until `stop` is set) and write the run directory.

    With `resume`, the config and progress come from `run_dir/state.db`; `bound_port`, when given, gets
    the port actually bound (for an address ending in :0)."""
    started = time.perf_counter()
    stop = stop or threading.Event()
    store = Store(config.run.resolved_dir / STATE_FILE)
    try:
        config = _config_for(config, store, resume)
        return _serve(config, store, resume, insecure, notify, on_round, stop, bound_port, started)
    finally:
        store.close()


def _config_for(config: Config, store: Store, resume: bool) -> Config:
    """The run's config: the given one for a new run; the stored one to resume (refusing a changed one)."""
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
    # the stored [privacy] also records the resolved noise multiplier and delta: compare the rest
    if to_toml(saved.model_copy(update={"privacy": config.privacy})) != to_toml(config):
        raise StateError(
            "--resume with a config that differs from the stored run's; resume with the same config file "
            f"(the stored one is in {config.run.resolved_dir / 'config.toml'})"
        )
    return saved


def _serve(
    config: Config,
    store: Store,
    resume: bool,
    insecure: bool,
    notify: Callable[[str], None],
    on_round: Callable[[dict[str, Any]], None],
    stop: threading.Event,
    bound_port: list[int] | None,
    started: float,
) -> ServerResult:
    check_deployment(config)
    if config.run.threads is not None:
        torch.set_num_threads(config.run.threads)
    fed, dep, seed = config.federation, config.deploy, config.run.seed
    population = sorted(dep.clients)
    model_dir = resolve_model_dir(config.model.name, notify)
    model = attach_lora(load_base_model(model_dir), config.lora, torch_generator(seed, "lora"))
    adapter = FlatAdapter(model)
    numel = adapter.numel
    checkpoint = store.latest_checkpoint() if resume else None
    dp_state = checkpoint.dp_state if checkpoint is not None else None
    config, dp = resolve_client_dp(config, len(population), fed.clients_per_round, numel, dp_state)
    run_dir = RunDir(config.run.resolved_dir)
    aggregator = make_aggregator(config.server)
    if checkpoint is None:
        store.start_run(to_toml(config))
        run_dir.create(config)
        global_flat = adapter.get()
        store.save_checkpoint(Checkpoint(0, global_flat, {}, _dp_state(dp)))
        rows: list[dict[str, Any]] = []
    else:
        global_flat = checkpoint.global_flat
        if global_flat.numel() != numel:
            raise StateError(f"the stored adapter has {global_flat.numel()} values, this model's {numel}")
        aggregator.server_opt.load_state_dict(checkpoint.optimizer_state)
        rows = [r.metrics for r in store.rounds() if r.metrics is not None and r.status in ("done", "failed")]
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.metrics_file.write_text("")
        for row in rows:
            run_dir.append_metrics(row)
        notify(f"resuming after round {checkpoint.round_num}")

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
    current = [0]
    limits = UpdateLimits(numel, int(dep.max_update_mib * 2**20))
    limits_now = [limits]  # the open round's (a secure round accepts masked inputs only)
    cap = config.data.max_examples_per_client
    secure_weight = 1 if dp is not None else (cap if isinstance(cap, int) else 0)
    max_weight = config.data.max_examples_per_client

    def weight_of(num_examples: int) -> int:
        """Client-level DP weighs every client 1; otherwise its examples, capped at the public bound."""
        if dp is not None:
            return 1
        return num_examples if max_weight == "all" else min(num_examples, max_weight)

    chunk_bytes = dep.chunk_kib * 1024
    service = FederationService(
        coordinator,
        lambda: limits_now[0],
        chunk_bytes=chunk_bytes,
        insecure=insecure,
        weight_of=weight_of,
        max_concurrent_uploads=dep.max_concurrent_uploads,
    )
    # no bandwidth-delay probing: each stream keeps HTTP/2's fixed 64 KiB window, so uploads waiting for a
    # slot hold 64 KiB each in the transport instead of growing windows of several MiB
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
    host = dep.address.rsplit(":", 1)[0]
    notify(
        f"serving on {host}:{port} ({'INSECURE' if insecure else 'mutual TLS'}), {len(population)} clients"
    )
    notes: list[str] = []
    encoding = ClientEncoding(config)
    cohort_rng = os_entropy_rng() if dp is not None else None
    selected_count = min(len(population), math.ceil(fed.clients_per_round * (1 + dep.over_selection)))
    min_clients = dep.min_clients or fed.clients_per_round
    min_connected = len(population) if dep.min_connected == "all" else dep.min_connected
    try:
        first = (checkpoint.round_num + 1) if checkpoint is not None else 1
        for round_num in range(first, fed.rounds + 1):
            if stop.is_set():
                break
            if dp is not None and not dp.round_fits_budget():
                notes.append(
                    f"stopped before round {round_num}: it could spend more than privacy.target_epsilon = "
                    f"{config.privacy.target_epsilon}"
                )
                notify(notes[-1])
                break
            current[0] = round_num
            live = coordinator.wait_connected(min_connected, dep.wait_for_clients_s, stop)
            if stop.is_set():
                break
            t_round = time.perf_counter()
            rng = cohort_rng if cohort_rng is not None else numpy_rng(seed, "sample", round_num)
            chosen = [population[i] for i in sample_clients(len(population), selected_count, rng).tolist()]
            store.open_round(round_num, chosen)
            shared_seed = encoding.shared_seed(round_num)
            # under secure aggregation the fixed-point encoding may round a clipped update a little longer
            clip = dp.clip_l2_norm - dp.plan.clip_margin if dp is not None else 0.0
            task = RoundTask(
                round_num,
                float32_bytes(global_flat.numpy()),
                numel,
                clip,
                shared_seed or b"",
                coordinator.clock() + dep.round_timeout_s,
            )
            collector = PlainCollector(aggregator, len(chosen), numel, shared_seed, admit=_admit(dp))
            sink = collector.submit
            limits_now[0] = limits
            if config.secure_aggregation.enabled:
                vector_size = numel if shared_seed is None else num_kept(numel, encoding.spec.fraction)
                params = secure_params(
                    config.secure_aggregation, len(chosen), vector_size, secure_weight, round_num
                )
                task.secure = secure = SecureRound(params, len(chosen))
                limits_now[0] = replace(limits, masked_words=params.payload_words)
                sink = partial(_masked_sink, secure)
            coordinator.open_round(task, chosen, fed.clients_per_round, sink)
            notify(f"round {round_num}: selected {len(chosen)} of {len(population)} ({live} connected)")
            if task.secure is not None:  # keys and shares before anyone trains, as in simulation
                for _stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
                    coordinator.wait_secure_stage(coordinator.clock() + dep.stage_timeout_s, stop)
                    coordinator.close_secure_stage()
            coordinator.wait_round(stop)
            if task.secure is not None:  # close the masked inputs, then unmask
                coordinator.close_secure_stage()
                coordinator.wait_secure_stage(coordinator.clock() + dep.stage_timeout_s, stop)
                coordinator.close_secure_stage()
            if stop.is_set():
                break
            outcome = coordinator.close_round()
            if task.secure is None:
                collected = collector.finish()
            else:
                collected = _secure_collected(task.secure, numel, encoding, shared_seed)
            global_flat, row = _finish_round(
                outcome, collected, aggregator, dp, global_flat, min_clients, config
            )
            row["seconds"] = time.perf_counter() - t_round
            ckpt = Checkpoint(round_num, global_flat, aggregator.server_opt.state_dict(), _dp_state(dp))
            if "round_failed" in row:  # the checkpoint carries the unchanged state past the failed round
                store.fail_round(round_num, row["round_failed"], row, ckpt)
            else:
                store.finish_round(round_num, row, ckpt)
            store.keep_checkpoints()
            rows.append(row)
            run_dir.append_metrics(row)
            on_round(row)
        else:
            save_adapter(model, adapter, global_flat, run_dir.adapter_dir, model_dir)
            coordinator.finish("the run is complete")
            _drain(coordinator, dep.poll_interval_s, dep.session_timeout_s)
            return ServerResult(run_dir.path, rows, time.perf_counter() - started, numel, notes)
        if not stop.is_set():  # stopped by the privacy budget
            save_adapter(model, adapter, global_flat, run_dir.adapter_dir, model_dir)
            coordinator.finish(notes[-1] if notes else "the run stopped")
            _drain(coordinator, dep.poll_interval_s, dep.session_timeout_s)
        return ServerResult(run_dir.path, rows, time.perf_counter() - started, numel, notes)
    finally:
        server.stop(grace=1.0)


def _admit(dp: ClientLevelDp | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The server's own check of each decoded delta: finite, and within the DP clip norm (a client that
    skipped clipping gains nothing)."""

    def admit(delta: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(delta).all():
            raise ValueError("the decoded update holds NaN or Inf values")
        return delta if dp is None else clip_l2(delta, dp.clip_l2_norm).delta

    return admit


def _dp_state(dp: ClientLevelDp | None) -> dict[str, Any] | None:
    return None if dp is None else dp.state_dict()


def _masked_sink(secure: SecureRound, slot: int, data: bytes | torch.Tensor, weight: int) -> None:
    """A secure round's masked input into the running sum (its weight is inside the payload)."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError("a secure round takes masked inputs only")
    secure.masked(slot, data)


def _secure_collected(
    secure: SecureRound, numel: int, encoding: ClientEncoding, shared_seed: bytes | None
) -> Collected:
    """The unmasked weighted mean (random-k: expanded onto the round's coordinates), or nothing on abort."""
    if secure.decoded is None:
        return Collected(None, 0, 0, 0, secure.metrics())
    mean = torch.from_numpy(secure.decoded.mean)
    if shared_seed is not None:
        mean = scatter_shared(mean, numel=numel, spec=encoding.spec, shared_seed=shared_seed)
    return Collected(mean, len(secure.included), 0, 0, secure.metrics())


def _finish_round(
    outcome: RoundOutcome,
    collected: Collected,
    aggregator: Any,
    dp: ClientLevelDp | None,
    global_flat: torch.Tensor,
    min_clients: int,
    config: Config,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Add DP noise to the round's aggregate, step the server optimizer; the round's metrics row."""
    accepted = outcome.accepted
    row: dict[str, Any] = {
        "round": outcome.round_num,
        "clients": collected.clients,
        "selected": len(outcome.selected),
        "stragglers": outcome.stragglers,
        "failed_clients": [r.client_id for r in outcome.refused],
        "failures": {r.client_id: r.error for r in outcome.refused},
        "train_loss": _weighted([(r.train_loss, r.num_examples) for r in accepted]),
        "eval_loss": _weighted([(r.eval_loss, r.eval_examples) for r in accepted if r.eval_loss is not None]),
        "bytes_up": outcome.bytes_up,
        "bytes_down": outcome.bytes_down,
        "refused_messages": outcome.messages_refused,
        **collected.metrics,
    }
    if dp is None:
        row["client_ids"] = [r.client_id for r in accepted]
    if collected.clients < min_clients or "secagg_abort" in row:
        why = (
            row.get("secagg_abort")
            or f"{collected.clients} updates arrived, deploy.min_clients = {min_clients}"
        )
        row["round_failed"] = f"{why}: the global adapter is left as it was"
        return global_flat, row
    applied = collected.delta
    if dp is not None:
        total = torch.zeros_like(global_flat) if applied is None else applied * collected.clients
        applied = dp.noised_mean(total)
        row |= dp.end_round(
            unclipped=sum(r.fits_clip for r in accepted), reported=config.federation.clients_per_round
        )
    if applied is not None:
        global_flat = aggregator.server_opt.step(global_flat, applied)
    return global_flat, row


def _weighted(pairs: list[tuple[float | None, int]]) -> float | None:
    """Weighted mean of the finite values, None without any."""
    ok = [(v, w) for v, w in pairs if v is not None and np.isfinite(v) and w > 0]
    if not ok:
        return None
    return sum(v * w for v, w in ok) / sum(w for _, w in ok)


def _drain(coordinator: Coordinator, poll_interval_s: float, session_timeout_s: float) -> None:
    """Give connected clients a few polls to hear that the run is done before the server goes away."""
    end = time.monotonic() + min(session_timeout_s, 3 * poll_interval_s + 1.0)
    while time.monotonic() < end and coordinator.undone_sessions():
        time.sleep(0.05)
