"""Who attacks a run and with what numbers, resolved once the population is known: `AttackPlan`.

Attackers are a seeded `attack.fraction` of the population (its own stream of the run seed: the same
config gives the same attackers) or the named `attack.clients`. The plan is plain values and the
attackers' data, so it travels to a worker process with the simulation's recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedtune.attack.poison import alie_z
from fedtune.attack.settings import COLLUSIVE, AttackConfig, AttackKind
from fedtune.data import ClientData
from fedtune.errors import ConfigError
from fedtune.seeding import numpy_rng


@dataclass(frozen=True)
class AttackPlan:
    kind: AttackKind
    attackers: tuple[str, ...]  # client ids, sorted
    boost: float  # scale's (and backdoor's) factor on the delta
    gaussian_rms_multiple: float
    z: float  # alie
    direction: Literal["unit", "std", "sign"]  # min_max
    claimed_examples: int | None  # free_rider; None: its own count
    batch_size: int  # train.batch_size: the steps a free rider claims under local_epochs
    colluders: tuple[ClientData, ...] = ()  # alie, min_max: every attacker's data, to pool honest deltas

    @property
    def collusive(self) -> bool:
        return self.kind in COLLUSIVE

    def attacks(self, client_id: str) -> bool:
        return client_id in self.attackers


def choose_attackers(cfg: AttackConfig, population: Sequence[str], seed: int) -> tuple[str, ...]:
    """The attacking client ids, sorted: the named ones (each must be in the population), or a seeded
    `fraction` of it (at least one)."""
    if cfg.clients:
        unknown = sorted(set(cfg.clients) - set(population))
        if unknown:
            raise ConfigError(
                f"attack.clients names {unknown}, not in this run's population of {len(population)} "
                f"clients (e.g. {sorted(population)[:3]}); name clients of the population"
            )
        return tuple(sorted(set(cfg.clients)))
    assert cfg.fraction is not None  # checked at load: exactly one of fraction and clients
    count = round(cfg.fraction * len(population))
    if count < 1:
        raise ConfigError(
            f"attack.fraction = {cfg.fraction} of {len(population)} clients is no attacker; raise "
            "attack.fraction or federation.num_clients, or name attack.clients"
        )
    rng = numpy_rng(seed, "attack-clients")
    chosen = rng.choice(len(population), size=count, replace=False)
    return tuple(sorted(population[int(i)] for i in chosen))


def plan_attack(
    cfg: AttackConfig,
    clients: Sequence[ClientData],
    *,
    seed: int,
    cohort: int,
    weight_cap: int | None,
    batch_size: int,
) -> AttackPlan | None:
    """The run's attack (None without one). `cohort`: clients per round (scale's default boost);
    `weight_cap`: the largest weight the server grants (a free rider's default claim); `batch_size`:
    train.batch_size."""
    if not cfg.active:
        return None
    population = [c.client_id for c in clients]
    attackers = choose_attackers(cfg, population, seed)
    if cfg.kind in COLLUSIVE and len(attackers) < 2:
        raise ConfigError(
            f"attack.kind = {cfg.kind!r} makes its vector from the spread of the attackers' honest "
            f"deltas, and this run has {len(attackers)} attacker; raise attack.fraction or name more "
            "attack.clients"
        )
    boost = cfg.boost if cfg.boost is not None else float(cohort) if cfg.kind == "scale" else 1.0
    z = alie_z(len(population), len(attackers)) if cfg.z == "auto" else cfg.z
    by_id = {c.client_id: c for c in clients}
    return AttackPlan(
        kind=cfg.kind,
        attackers=attackers,
        boost=boost,
        gaussian_rms_multiple=cfg.gaussian_rms_multiple,
        z=z,
        direction=cfg.min_max_direction,
        claimed_examples=cfg.claimed_examples if cfg.claimed_examples is not None else weight_cap,
        batch_size=batch_size,
        colluders=tuple(by_id[cid] for cid in attackers) if cfg.kind in COLLUSIVE else (),
    )
