"""Attack simulation: poisoned clients wrapped around honest participants (`[attack]`, simulation only)."""

from fedtune.attack.backdoor import (
    Backdoor,
    Probes,
    make_probes,
    poison_client,
    preference_rate,
    success_rate,
)
from fedtune.attack.plan import AttackPlan, choose_attackers, plan_attack
from fedtune.attack.settings import AttackConfig
from fedtune.attack.trainer import PoisonedTrainer

__all__ = [
    "AttackConfig",
    "AttackPlan",
    "Backdoor",
    "PoisonedTrainer",
    "Probes",
    "choose_attackers",
    "make_probes",
    "plan_attack",
    "poison_client",
    "preference_rate",
    "success_rate",
]
