"""The simulation engine: many virtual clients, ONE base model in memory.

Set up (model, adapter, data) -> rounds (sample, train each client, aggregate, evaluate) -> save
(adapter, metrics, report). Clients keep no model state: the trainer swaps the global adapter into the
shared model before each client and reads the delta out after, so memory does not grow with the number of
clients beyond their data. The round's parts (trainer, aggregator, sampling) are the ones a deployed server
and client use; only the transport, here a function call, differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedtune.adapter import FlatAdapter, attach_lora, save_adapter
from fedtune.aggregate import Aggregator, make_aggregator
from fedtune.client import ClientUpdate, LocalTrainer, Trainer
from fedtune.collect import Collector, PlainCollector, SecureCollector, secure_threshold
from fedtune.compress import num_kept, scatter_shared
from fedtune.config import Config, check_secure_aggregation
from fedtune.data import ClientData, load_clients
from fedtune.encoding import ClientEncoding
from fedtune.evaluate import EvalResult, evaluate
from fedtune.models import load_base_model, load_tokenizer, resolve_model_dir
from fedtune.privacy.cohort import poisson_cohort
from fedtune.privacy.distributed import add_noise_to_payload
from fedtune.privacy.dpfedavg import ClientLevelDp, resolve_client_dp
from fedtune.privacy.dpsgd import DpSgdSettings, DpSgdTrainer, check_dpsgd_model, record_epsilon
from fedtune.privacy.noise import os_entropy_generator, os_entropy_rng
from fedtune.report import write_report
from fedtune.rundir import RunDir
from fedtune.sampling import clients_per_round, sample_clients
from fedtune.secagg import Stage
from fedtune.seeding import derive_seed, numpy_rng, torch_generator


class Observer(Protocol):
    """Progress hooks; the CLI shows them with rich, tests pass `Silent()`."""

    def start(self, rounds: int, total_steps: int) -> None: ...
    def client_started(self, round_num: int, client_id: str) -> None: ...
    def step(self, loss: float) -> None: ...
    def evaluating(self, round_num: int) -> None: ...
    def round_finished(self, row: dict[str, Any]) -> None: ...


class Silent:
    def start(self, rounds: int, total_steps: int) -> None: ...
    def client_started(self, round_num: int, client_id: str) -> None: ...
    def step(self, loss: float) -> None: ...
    def evaluating(self, round_num: int) -> None: ...
    def round_finished(self, row: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    before: EvalResult
    after: EvalResult
    seconds: float
    num_clients: int
    adapter_numel: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Setup:
    """Everything a run builds once, before round 1."""

    model_dir: Path
    model: torch.nn.Module
    adapter: FlatAdapter
    trainer: Trainer
    clients: list[ClientData]
    eval_clients: list[ClientData]

    @property
    def max_train_examples(self) -> int:
        """The largest client weight: public, it bounds the secure aggregation encoding."""
        return max(len(c.train) for c in self.clients)


def setup(config: Config, notify: Callable[[str], None]) -> Setup:
    """Load model, tokenizer and data, attach LoRA; refuses bad input before any training."""
    seed = config.run.seed
    model_dir = resolve_model_dir(config.model.name, notify)
    tokenizer = load_tokenizer(model_dir)
    clients = load_clients(config.data, config.federation.num_clients, tokenizer, numpy_rng(seed, "data"))
    eval_clients = clients
    if config.eval.max_clients != "all" and config.eval.max_clients < len(clients):
        chosen = sample_clients(len(clients), config.eval.max_clients, numpy_rng(seed, "eval"))
        eval_clients = [clients[i] for i in chosen]
    model = attach_lora(load_base_model(model_dir), config.lora, torch_generator(seed, "lora"))
    adapter = FlatAdapter(model)
    trainer: Trainer = LocalTrainer(model, adapter, config.train, tokenizer.pad_token_id)
    if config.dpsgd.enabled:  # sample-level DP on every client: per-example clipping and noise (Opacus)
        check_dpsgd_model(model)
        trainer = DpSgdTrainer(
            model,
            adapter,
            config.train,
            tokenizer.pad_token_id,
            DpSgdSettings(config.dpsgd.noise_multiplier, config.dpsgd.max_grad_norm),
            os_entropy_generator(),
            os_entropy_generator(),
        )
    built = Setup(model_dir, model, adapter, trainer, clients, eval_clients)
    if config.secure_aggregation.enabled:  # again, now that the cohort and the weights are known
        check_secure_aggregation(config, len(clients), built.max_train_examples)
    return built


def _train_loss(updates: list[ClientUpdate]) -> float | None:
    """Example-weighted mean of the clients' mean local losses."""
    ok = [u for u in updates if u.ok]
    if not ok:
        return None
    return sum(u.train_loss * u.num_examples for u in ok) / sum(u.num_examples for u in ok)


def simulate(
    config: Config,
    observer: Observer | None = None,
    notify: Callable[[str], None] = lambda _msg: None,
) -> RunResult:
    """Run one federated fine-tuning job in simulation and write its run directory."""
    observer = observer or Silent()
    started = time.perf_counter()
    if config.run.threads is not None:
        torch.set_num_threads(config.run.threads)
    seed, fed = config.run.seed, config.federation
    s = setup(config, notify)
    cohort = clients_per_round(fed, len(s.clients))
    # config now records the resolved noise multiplier and delta
    config, dp = resolve_client_dp(config, len(s.clients), cohort, s.adapter.numel)
    run_dir = RunDir(config.run.resolved_dir)
    run_dir.create(config)
    aggregator = make_aggregator(config.server)
    encoding = ClientEncoding(config)
    notes: list[str] = []
    privacy_steps: dict[str, int] = {}  # DP-SGD: local steps each client has taken on its records
    # under DP the cohort draw is part of the guarantee (sampling amplification): unpredictable, from the OS
    cohort_rng = os_entropy_rng() if dp is not None else None
    steps_per_client = fed.local_steps
    if fed.local_epochs is not None:
        mean_train = sum(len(c.train) for c in s.clients) / len(s.clients)
        steps_per_client = fed.local_epochs * -(-int(mean_train) // config.train.batch_size)
    observer.start(fed.rounds, fed.rounds * cohort * steps_per_client)

    global_flat = s.adapter.get()

    def run_eval(round_num: int) -> tuple[EvalResult, float]:
        observer.evaluating(round_num)
        t = time.perf_counter()
        s.adapter.load(global_flat)
        return evaluate(s.model, s.eval_clients, config.eval, s.trainer.pad_id), (time.perf_counter() - t)

    before, eval_seconds = run_eval(0)
    rows = [
        {
            "round": 0,
            "clients": 0,
            "train_loss": None,
            "eval_loss": before.loss,
            "eval_perplexity": before.perplexity,
            "bytes_up": 0,
            "bytes_down": 0,
            "seconds": eval_seconds,
            "eval_seconds": eval_seconds,
        }
    ]
    if dp is not None:
        rows[0]["epsilon"] = 0.0
    run_dir.append_metrics(rows[0])
    observer.round_finished(rows[0])
    after = before

    def budget_stop(next_round: int) -> bool:
        """True (with a note) when the next round could spend more than privacy.target_epsilon."""
        if dp is None or dp.round_fits_budget(_fewest_noise_shares(config, cohort)):
            return False
        notes.append(
            f"stopped before round {next_round}: it could spend more than privacy.target_epsilon = "
            f"{config.privacy.target_epsilon}"
        )
        notify(notes[-1])
        return True

    for round_num in range(1, fed.rounds + 1 if not budget_stop(1) else 1):
        t_round = time.perf_counter()
        unclipped = 0
        chosen = _sample(len(s.clients), cohort, round_num, seed, dp, cohort_rng)
        collector = _collector(config, s, aggregator, encoding, len(chosen), round_num)
        updates: list[ClientUpdate] = []
        train_seconds = 0.0
        for slot, index in enumerate(chosen):
            if slot not in collector.admitted:
                continue  # dropped out before training (secure aggregation's key exchange)
            client = s.clients[index]
            observer.client_started(round_num, client.client_id)
            t = time.perf_counter()
            update = s.trainer.train(
                global_flat,
                client,
                seed=derive_seed(seed, "train", round_num, index),
                steps=None if fed.local_epochs is not None else fed.local_steps,
                epochs=fed.local_epochs,
                on_step=observer.step,
            )
            train_seconds += time.perf_counter() - t
            delta = update.delta
            if dp is not None and delta is None:
                delta = torch.zeros_like(global_flat)  # a refused update still counts (public denominator)
            if delta is not None:
                sent, fit = encoding.encode(
                    delta,
                    client.client_id,
                    round_num,
                    index,
                    masked=config.secure_aggregation.enabled,
                    clip=dp.clip if dp is not None else None,
                )
                unclipped += fit
                noise = _noise_share(dp) if dp is not None and dp.plan.mode == "distributed" else None
                weight = 1 if dp is not None else update.num_examples
                collector.submit(slot, sent, weight, noise)
            updates.append(replace(update, delta=None))  # keep the summary, not O(clients x adapter)
        collected = collector.finish()
        if config.dpsgd.enabled:
            privacy_steps.update(
                {u.client_id: privacy_steps.get(u.client_id, 0) + u.num_steps for u in updates}
            )
        applied = collected.delta
        privacy_row: dict[str, Any] = {}
        if dp is not None and "secagg_abort" not in collected.metrics:
            if collected.noised_sum is not None:  # distributed: the clients' shares are already in it
                applied = dp.mean(collected.noised_sum.total)
                contributors: int | None = collected.noised_sum.contributors
            else:  # central: the server adds the noise to the sum of clipped deltas
                total = torch.zeros_like(global_flat) if applied is None else applied * collected.clients
                applied, contributors = dp.noised_mean(total), None
            privacy_row = dp.end_round(
                unclipped=unclipped, reported=len(collector.admitted), contributors=contributors
            )
        if applied is not None:
            global_flat = aggregator.server_opt.step(global_flat, applied)
        row: dict[str, Any] = {
            "round": round_num,
            "clients": collected.clients,
            "selected": len(chosen),
            "failed_clients": [u.client_id for u in updates if not u.ok],
            "failures": {u.client_id: u.error for u in updates if not u.ok},
            "train_loss": _train_loss(updates),
            "eval_loss": None,
            "eval_perplexity": None,
            "bytes_up": collected.bytes_up,
            "bytes_down": collected.bytes_down,
            "train_seconds": train_seconds,
            **collected.metrics,
            **privacy_row,
        }
        if dp is None:  # under client-level DP who took part is not published: amplification relies on it
            row["client_ids"] = [u.client_id for u in updates]
        if config.dpsgd.enabled:
            row["dpsgd_epsilon_max"] = _dpsgd_epsilon(config, s, privacy_steps)
        last = round_num == fed.rounds or budget_stop(round_num + 1)
        if round_num % config.eval.every == 0 or last:  # the adapter a run ends with is always evaluated
            after, row["eval_seconds"] = run_eval(round_num)
            row["eval_loss"], row["eval_perplexity"] = after.loss, after.perplexity
        row["seconds"] = time.perf_counter() - t_round
        rows.append(row)
        run_dir.append_metrics(row)
        observer.round_finished(row)
        if last:
            break

    save_adapter(s.model, s.adapter, global_flat, run_dir.adapter_dir, s.model_dir)
    client_eval = {
        cid: {"before": loss, "after": after.per_client_loss[cid]}
        for cid, loss in before.per_client_loss.items()
    }
    run_dir.write_client_eval(client_eval)
    result = RunResult(
        run_dir=run_dir.path,
        rows=rows,
        before=before,
        after=after,
        seconds=time.perf_counter() - started,
        num_clients=len(s.clients),
        adapter_numel=s.adapter.numel,
        notes=notes,
    )
    _write_report(config, run_dir, result, client_eval)
    return result


def _sample(
    population: int,
    cohort: int,
    round_num: int,
    seed: int,
    dp: ClientLevelDp | None,
    cohort_rng: np.random.Generator | None,
) -> list[int]:
    """The round's cohort: seeded from the run without DP; from the OS with DP, Poisson or fixed size as
    the accountant assumes."""
    if dp is None or cohort_rng is None:
        return sample_clients(population, cohort, numpy_rng(seed, "sample", round_num)).tolist()
    if dp.plan.sampling.kind == "poisson":
        return poisson_cohort(population, dp.plan.sampling.probability, cohort_rng).tolist()
    return sample_clients(population, cohort, cohort_rng).tolist()


def _dpsgd_epsilon(config: Config, s: Setup, steps: dict[str, int]) -> float:
    """The largest per-record epsilon any client has spent on its own data so far (DP-SGD)."""
    sizes = {c.client_id: len(c.train) for c in s.clients}
    return (
        max(
            record_epsilon(
                sizes[cid], config.train.batch_size, config.dpsgd.noise_multiplier, n, config.dpsgd.delta
            )
            for cid, n in steps.items()
        )
        if steps
        else 0.0
    )


def _noise_share(dp: ClientLevelDp) -> Callable[[np.ndarray], np.ndarray]:
    """A client's Skellam share, added to its encoded payload (integer domain) before masking."""
    return lambda payload: add_noise_to_payload(payload, dp.noise_share())


def _fewest_noise_shares(config: Config, cohort: int) -> int | None:
    """Distributed noise: the fewest shares a released sum can hold (secure aggregation's threshold)."""
    if config.privacy.mode != "distributed":
        return None
    return secure_threshold(config.secure_aggregation, cohort)


def _collector(
    config: Config, s: Setup, aggregator: Aggregator, encoding: ClientEncoding, cohort: int, round_num: int
) -> Collector:
    """The round's collector; its random draws are seeded per round, the secrets are not."""
    shared_seed = encoding.shared_seed(round_num)
    numel = s.adapter.numel
    if not config.secure_aggregation.enabled:
        return PlainCollector(aggregator, cohort, numel, shared_seed)
    seed = config.run.seed
    masked_numel, expand = numel, None
    if shared_seed is not None:  # random-k: only the round's shared coordinates are masked and summed
        masked_numel = num_kept(numel, encoding.spec.fraction)
        expand = partial(scatter_shared, numel=numel, spec=encoding.spec, shared_seed=shared_seed)
    return SecureCollector(
        config.secure_aggregation,
        cohort,
        masked_numel,
        max_weight=1 if config.privacy.mode != "off" else s.max_train_examples,
        round_num=round_num,
        dropout_draws=numpy_rng(seed, "secagg-dropout", round_num).random((cohort, len(Stage))),
        rounding_rng=numpy_rng(seed, "secagg-rounding", round_num),
        # only to make a simulation repeatable; a deployment lets the server draw the graph from the OS
        graph_seed=derive_seed(seed, "secagg-graph", round_num).to_bytes(32, "big"),
        download_bytes=numel * 4,
        expand=expand,
    )


def _write_report(
    config: Config, run_dir: RunDir, result: RunResult, client_eval: dict[str, dict[str, float]]
) -> None:
    fed = config.federation
    summary = {
        "model": config.model.name,
        "data": f"{config.data.source} ({config.data.partition} split), {result.num_clients} clients",
        "rounds": f"{fed.rounds} x {clients_per_round(fed, result.num_clients)} clients",
        "local training": (f"{fed.local_epochs} epochs" if fed.local_epochs else f"{fed.local_steps} steps")
        + f", batch {config.train.batch_size}, lr {config.train.lr:g}",
        "LoRA": f"rank {config.lora.rank}, alpha {config.lora.alpha:g}, "
        f"{', '.join(config.lora.target_modules)} ({result.adapter_numel:,} parameters)",
        "aggregation": f"{config.server.rule}, server {config.server.optimizer} lr {config.server.lr:g}",
        "seed": str(config.run.seed),
        "wall time": f"{result.seconds:.1f} s",
    }
    write_report(
        run_dir.path,
        result.rows,
        client_eval,
        title=f"fedtune run `{config.run.name}`",
        summary=summary,
    )
