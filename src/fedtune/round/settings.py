"""The `[federation]`, `[eval]`, `[personalize]` and `[simulation]` config sections: the rounds, how the
global adapter is evaluated, the personal adapters each client keeps, and how a simulation computes its
clients."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from fedtune.section import PositiveInt, Section


class FederationConfig(Section):
    """The rounds: how many, which clients, how much local work, how few updates a round accepts, and who
    aggregates (a server, or each client with its neighbours)."""

    rounds: PositiveInt = 6
    num_clients: PositiveInt | Literal["all"] = 16  # population size, sampled from the eligible clients
    clients_per_round: PositiveInt = 4
    fraction_per_round: float | None = Field(None, gt=0.0, le=1.0)  # overrides clients_per_round
    local_steps: PositiveInt = 8
    local_epochs: PositiveInt | None = None  # when set, train whole epochs instead of local_steps
    min_clients: PositiveInt = 1  # a round with fewer updates fails and leaves the adapter as it was
    # simulation: replies the simulated clock (`round.clock`) finishes later than this are stragglers
    round_deadline_s: float | None = Field(None, gt=0.0)
    # star: a server aggregates each round's cohort into one global adapter; decentralized: every client
    # keeps its own adapter, trains it every round and mixes it with its neighbours' (`fedtune.decentral`)
    topology: Literal["star", "decentralized"] = "star"
    # decentralized: who talks to whom, drawn once from run.seed and connected (a random one is redrawn
    # until it is, and refused when it keeps coming out disconnected)
    graph: Literal["ring", "k_regular", "erdos_renyi"] = "ring"
    graph_degree: PositiveInt = 4  # k_regular: every client's number of neighbours
    graph_edge_probability: float = Field(0.3, gt=0.0, le=1.0)  # erdos_renyi: each pair's edge probability


class EvalConfig(Section):
    """Evaluation of the global adapter on the clients' held-out data."""

    every: PositiveInt = 2  # rounds; the first and last rounds are always evaluated
    max_clients: PositiveInt | Literal["all"] = "all"  # a fixed, seeded subset of the population
    max_examples_per_client: PositiveInt = 8
    batch_size: PositiveInt = 8


class PersonalizeConfig(Section):
    """Personal adapters, one per client, next to the global one (`round.personal`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # finetune: adapt the final global adapter; ditto: a personal adapter trained along (Ditto);
    # split: A is shared and aggregated, B stays with each client (FedSA-LoRA)
    method: Literal["none", "finetune", "ditto", "split"] = "none"
    steps: int = Field(8, ge=0)  # local steps that make a personal adapter after the last round
    lambda_: float = Field(0.1, ge=0.0, alias="lambda")  # ditto: the pull toward the global adapter
    lr: float | None = Field(None, gt=0.0)  # the personal adapters' AdamW learning rate; None: train.lr


class SimulationConfig(Section):
    """How a simulation computes its clients (`round.executor`, `round.pool`): one after another in
    this process, in worker processes on this machine, or on Ray actors."""

    # processes is the default: on the default job it takes 0.84x serial's time (bench/RESULTS.md)
    backend: Literal["serial", "processes", "ray"] = "processes"
    workers: PositiveInt | Literal["auto"] = "auto"  # processes, ray: how many at once; auto: one per core
    threads_per_worker: PositiveInt | Literal["auto"] = "auto"  # torch threads each; auto: cores / workers
    # ray: None starts a local Ray for the run (and stops it after); "auto" joins the cluster that
    # `ray start --head` started here; "ray://host:10001" or "host:6379" a remote one
    ray_address: str | None = None

    def pool(self, cores: int) -> tuple[int, int]:
        """(workers, torch threads per worker) on a machine of `cores` cores."""
        workers = cores if self.workers == "auto" else self.workers
        threads = max(1, cores // workers) if self.threads_per_worker == "auto" else self.threads_per_worker
        return workers, threads
