"""Who trains a simulation's clients: the one model of this process, or a pool of workers, each with its own.

`ClientFactory` makes a client's participant over a loaded model: the run's trainers, where its personal
adapter is saved, the generator of its distributed-DP noise shares. The serial executor uses the one the
simulation built over its model; a forked worker inherits it (`Inherited`), any other builds its own from
a `SimulationRecipe` (the config; the base weights are mapped from the model's safetensors file, so on
one machine they are in memory once). `executor_for` picks by `[simulation] backend`: serial, `processes`
(`round.processes`), or `ray` (`round.ray_workers`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtune.attack import AttackPlan, PoisonedTrainer
from fedtune.audit.canary import CanaryPlan, CanaryTrainer
from fedtune.config import Config
from fedtune.data import ClientData
from fedtune.local import load_model, make_personal_trainer, make_trainer
from fedtune.model.adapter import save_adapter
from fedtune.model.base import resolve_model_dir
from fedtune.privacy.noise import os_entropy_rng
from fedtune.round.executor import Executor, SerialExecutor
from fedtune.round.participant import Participant
from fedtune.round.plan import Member, ParticipantSpec
from fedtune.round.pool import PoolExecutor, cores
from fedtune.round.state import ClientStateStore
from fedtune.rundir import client_dir
from fedtune.train.local import LocalModel, LocalTrainer, Trainer


@dataclass
class ClientFactory:
    """Participants over one loaded model (`round.worker.ParticipantFactory`); an attacker's (`[attack]`)
    trains with the honest trainer wrapped in its poisoning, an audit's canary (`[audit]`) sends its
    fixed update instead of training."""

    local: LocalModel
    trainer: Trainer
    personal_trainer: LocalTrainer | None
    model_dir: Path
    personal_root: Path  # personal adapters are saved here, one folder per client
    noise_rng: np.random.Generator | None  # distributed DP's shares (None: no distributed DP)
    attack: AttackPlan | None = None
    poisoned: PoisonedTrainer | None = None  # the attackers' trainer (one: it keeps the colluders' pool)
    canaries: CanaryPlan | None = None

    @classmethod
    def over(
        cls,
        config: Config,
        local: LocalModel,
        model_dir: Path,
        personal_root: Path,
        noise_rng: np.random.Generator | None,
        attack: AttackPlan | None = None,
        canaries: CanaryPlan | None = None,
    ) -> ClientFactory:
        trainer, personal = make_trainer(config, local), make_personal_trainer(config, local)
        poisoned = None if attack is None else PoisonedTrainer(trainer, attack)
        return cls(local, trainer, personal, model_dir, personal_root, noise_rng, attack, poisoned, canaries)

    def keep_personal(self, client_id: str, flat: torch.Tensor) -> None:
        folder = client_dir(self.personal_root, client_id)
        save_adapter(self.local.model, self.local.adapter, flat, folder, self.model_dir)

    def __call__(
        self,
        data: ClientData,
        spec: ParticipantSpec,
        states: ClientStateStore,
        on_step: Callable[[float], None],
    ) -> Participant:
        trainer: Trainer = self.trainer
        if self.poisoned is not None and self.poisoned.plan.attacks(data.client_id):
            trainer = self.poisoned
        if self.canaries is not None and self.canaries.holds(data.client_id):
            trainer = CanaryTrainer(self.canaries, self.trainer.pad_id)
        return Participant(
            data,
            self.local,
            trainer,
            states,
            spec,
            noise_rng=self.noise_rng,
            on_step=on_step,
            personal_trainer=self.personal_trainer,
            keep_personal=self.keep_personal,
        )


@dataclass(frozen=True)
class SimulationRecipe:
    """What a worker builds its model and trainers from (`round.worker.WorkerRecipe`); picklable. The
    model is resolved by name where the worker runs (a built-in one is made once on each node)."""

    config: Config
    personal_root: Path  # absolute: a worker may run elsewhere
    pad_id: int
    noise_shares: bool  # distributed DP: the worker draws its clients' shares from the OS
    attack: AttackPlan | None = None
    canaries: CanaryPlan | None = None

    def build(self) -> ClientFactory:
        model_dir = resolve_model_dir(self.config.model.name)
        local = load_model(self.config, model_dir, self.pad_id)
        rng = os_entropy_rng() if self.noise_shares else None
        return ClientFactory.over(
            self.config, local, model_dir, self.personal_root, rng, self.attack, self.canaries
        )


@dataclass(frozen=True)
class Inherited:
    """A forked worker's recipe: the parent's loaded model, inherited with the process. The trainers and
    the noise generator are made again in the worker: a copied generator would draw the same DP-SGD
    noise, and the same distributed-DP shares, in every worker."""

    config: Config
    factory: ClientFactory

    def build(self) -> ClientFactory:
        parent = self.factory
        rng = None if parent.noise_rng is None else os_entropy_rng()
        return ClientFactory.over(
            self.config,
            parent.local,
            parent.model_dir,
            parent.personal_root,
            rng,
            parent.attack,
            parent.canaries,
        )


def executor_for(
    config: Config,
    factory: ClientFactory,
    client_for: Callable[[Member], tuple[ClientData, ParticipantSpec]],
    states: ClientStateStore,
    *,
    on_step: Callable[[float], None],
    notify: Callable[[str], None] = lambda _msg: None,
) -> Executor:
    """The executor `[simulation] backend` names; a pool's workers start with its first round."""
    sim = config.simulation
    if sim.backend == "serial":
        return SerialExecutor(lambda member: factory(*client_for(member), states, on_step))
    workers, threads = sim.pool(cores())
    kind = "worker processes" if sim.backend == "processes" else "Ray actors"
    notify(f"{workers} {kind} of {threads} torch thread{'s' if threads > 1 else ''} each train the clients")
    recipe = SimulationRecipe(
        config,
        factory.personal_root.resolve(),
        factory.local.pad_id,
        factory.noise_rng is not None,
        factory.attack,
        factory.canaries,
    )
    if sim.backend == "processes":
        from fedtune.round.processes import ProcessWorkers

        if threads == 1 and sys.platform.startswith("linux"):  # a copy of this process: see round.processes
            pool = ProcessWorkers(Inherited(config, factory), size=workers, threads=1, start_method="fork")
        else:
            pool = ProcessWorkers(recipe, size=workers, threads=threads, start_method="forkserver")
    else:
        from fedtune.round.ray_workers import RayWorkers

        pool = RayWorkers(recipe, size=workers, threads=threads, address=sim.ray_address)
    return PoolExecutor(pool, client_for, states, on_step=on_step)
