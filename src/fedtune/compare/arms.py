"""The arms that do not federate, run by the round engine on the federated run's model and clients.

Both start from the federated run's initial adapter (the same LoRA A, B = 0), train with its trainer
(DP-SGD's when `dpsgd.enabled`) and evaluate each client on the same held-out examples; nothing travels,
so they run without secure aggregation, compression, client-level DP, personalization or `[clients]`
profiles, and with server SGD at lr 1 (the adapter after the round is the one trained):
- `local`: each evaluated client alone, one round of as many local steps as it trained in the federated
  run (`StepLedger`), evaluated on its own held-out data; a client that never trained there gets none
  here either, and its loss is the base model's;
- `centralized`: one pooled client holding every client's training examples (in client order), one round
  of the federated run's total steps at the same batch size, so the same number of examples, evaluated by
  the evaluation clients (`RunPlan.trainers` keeps the cohort to the pooled client). It is the first of
  its population, as a local-only client is of its own, so with one client the two arms are one run.
Each arm writes its own `metrics.jsonl` (one row per round it ran) under the seed's folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedtune.aggregate import make_aggregator
from fedtune.compare.results import ArmRun
from fedtune.compress import CompressionSpec
from fedtune.config import CompressionConfig, Config, ServerConfig
from fedtune.config.plan import participant_spec
from fedtune.data import ClientData
from fedtune.local import make_trainer
from fedtune.round.engine import RoundEngine
from fedtune.round.inprocess import InProcessTransport
from fedtune.round.participant import Participant
from fedtune.round.plan import LocalWork, Member, RunPlan, WeightRule
from fedtune.round.results import EvalSummary
from fedtune.round.state import ClientStateStore
from fedtune.rundir import RunDir, client_dir
from fedtune.train.local import LocalModel

POOLED = "centralized"  # the pooled client's id
INT32_BYTES = 4


@dataclass(frozen=True, eq=False)
class Baseline:
    """What the non-federated arms of one seed share with its federated run."""

    config: Config  # the federated run's, resolved
    clients: Sequence[ClientData]  # the population, sorted by id
    local: LocalModel
    initial: torch.Tensor  # the adapter before round 1
    eval_members: tuple[int, ...]  # population indices that evaluate
    base: EvalSummary  # the federated run's round 0: the base model on every evaluation client

    @property
    def eval_ids(self) -> list[str]:
        return [self.clients[i].client_id for i in self.eval_members]


def eval_tokens(client: ClientData, max_examples: int) -> int:
    """The tokens a client's evaluation covers: every next-token target of its first held-out examples."""
    return sum(len(ids) - 1 for ids in client.eval[:max_examples])


def weighted_loss(per_client: Mapping[str, float], tokens: Mapping[str, int]) -> float:
    """The token-weighted loss over the clients, as the engine combines an evaluation."""
    total = sum(tokens[cid] for cid in per_client)
    return sum(loss * tokens[cid] for cid, loss in per_client.items()) / total


def _engine(
    b: Baseline,
    population: Sequence[ClientData],
    steps: int,
    *,
    eval_members: tuple[int, ...],
    trainers: tuple[int, ...] | None = None,
) -> RoundEngine:
    """One round of `steps` local steps by one client of `population`, then the evaluation."""
    cfg = b.config
    spec = replace(participant_spec(_quiet(cfg)), work=LocalWork(steps=steps))
    trainer, layout = make_trainer(cfg, b.local), b.local.adapter.layout

    def participant_for(member: Member) -> Participant:
        return Participant(population[member.index], b.local, trainer, ClientStateStore(), spec)

    plan = RunPlan(
        seed=cfg.run.seed,
        rounds=1,
        population=tuple(c.client_id for c in population),
        cohort=1,
        selected=1,
        min_clients=1,
        eval_every=1,
        eval_members=eval_members,
        weights=WeightRule(),
        compression=CompressionSpec.from_config(CompressionConfig()),
        adapter_numel=b.local.adapter.numel,
        dpsgd=cfg.dpsgd.enabled,
        layout=layout,
        trainers=trainers,
    )
    lora = "ffa" if cfg.server.lora_aggregation == "ffa" else "separate"
    aggregator = make_aggregator(ServerConfig(lora_aggregation=lora), layout=layout)
    return RoundEngine(plan, InProcessTransport(participant_for), aggregator, b.initial.clone())


def _quiet(config: Config) -> Config:
    """The config with nothing that only a federation needs."""
    return config.model_copy(
        update={
            "compression": CompressionConfig(),
            "privacy": type(config.privacy)(),
            "secure_aggregation": type(config.secure_aggregation)(),
            "personalize": type(config.personalize)(),
            "server": ServerConfig(),
        }
    )


def _run(engine: RoundEngine, folder: Path) -> EvalSummary:
    """Round 1 (no round 0: the base model is the federated run's), its row in `folder`/metrics.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(folder)
    run_dir.metrics_file.write_text("")
    evaluation = None
    for result in engine.run(first_round=1):
        run_dir.append(result)
        evaluation = result.eval
    if evaluation is None:
        raise RuntimeError("a compare arm's round was not evaluated")
    return evaluation


def local_arm(b: Baseline, steps_by_client: Mapping[str, int], folder: Path, seed: int) -> ArmRun:
    """Each evaluation client alone, for the steps it trained in the federated run."""
    start = time.perf_counter()
    per_client: dict[str, float] = {}
    steps_total = 0
    for index in b.eval_members:
        client = b.clients[index]
        steps = steps_by_client.get(client.client_id, 0)
        if steps == 0:  # it never trained in federation: alone, it has the base model
            per_client[client.client_id] = b.base.per_client_loss[client.client_id]
            continue
        engine = _engine(b, [client], steps, eval_members=(0,))
        evaluation = _run(engine, client_dir(folder, client.client_id))
        per_client[client.client_id] = evaluation.per_client_loss[client.client_id]
        steps_total += steps
    tokens = {
        b.clients[i].client_id: eval_tokens(b.clients[i], b.config.eval.max_examples_per_client)
        for i in b.eval_members
    }
    return ArmRun(
        arm="local",
        seed=seed,
        loss=weighted_loss(per_client, tokens),
        per_client_loss=per_client,
        steps=steps_total,
        examples=steps_total * b.config.train.batch_size,
        bytes_moved=0,
        seconds=time.perf_counter() - start,
    )


def centralized_arm(b: Baseline, total_steps: int, folder: Path, seed: int) -> ArmRun:
    """Every client's training examples pooled in one place, the federated run's total steps."""
    start = time.perf_counter()
    pooled = ClientData(POOLED, train=[ids for c in b.clients for ids in c.train], eval=[])
    population = [pooled, *b.clients]  # the pooled client first: it is seeded as a lone client is
    evaluators = tuple(i + 1 for i in b.eval_members)
    engine = _engine(b, population, total_steps, eval_members=evaluators, trainers=(0,))
    evaluation = _run(engine, folder)
    moved = sum(len(ids) for ids in pooled.train) * INT32_BYTES
    return ArmRun(
        arm="centralized",
        seed=seed,
        loss=evaluation.loss,
        per_client_loss=dict(evaluation.per_client_loss),
        steps=total_steps,
        examples=total_steps * b.config.train.batch_size,
        bytes_moved=moved,
        seconds=time.perf_counter() - start,
    )
