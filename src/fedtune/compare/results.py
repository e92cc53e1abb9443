"""What `fedtune compare` measured: one `ArmRun` per arm and seed, gathered in a `Comparison`.

An arm is one way to fine-tune on the same clients and held-out splits: `base` (no training), `local`
(each client alone), `centralized` (every client's training data pooled), `federated` (the config as
given) and `personalized` (the federated run's personal adapters, when `[personalize]` is on). Every
loss is a mean next-token loss on the evaluated clients' own held-out examples; an arm's overall loss is
token-weighted over those clients (`tokens`), as the round engine's evaluation is.
"""

from __future__ import annotations

from dataclasses import dataclass

ARMS = ("base", "local", "centralized", "federated", "personalized")
ARM_TITLES = {
    "base": "base model",
    "local": "local only",
    "centralized": "centralized",
    "federated": "federated",
    "personalized": "federated + personalized",
}


@dataclass(frozen=True)
class ArmRun:
    """One arm under one seed."""

    arm: str  # one of ARMS
    seed: int  # run.seed of this repetition
    loss: float  # token-weighted mean eval loss over the evaluated clients
    per_client_loss: dict[str, float]  # each evaluated client's mean eval loss
    steps: int  # optimizer steps taken, all clients together
    examples: int  # training examples those steps consumed (with repeats)
    bytes_moved: int  # bytes that left a client or the server (the pooled data, for centralized)
    seconds: float  # wall time of the arm
    epsilon: float | None = None  # client-level DP's epsilon spent (federated arms under DP)
    run_dir: str | None = None  # where the arm's own metrics.jsonl is, relative to the compare folder


@dataclass(frozen=True)
class Comparison:
    """Every arm under every seed, on the same clients."""

    name: str  # run.name of the compared config
    arms: tuple[str, ...]  # the arms run, in ARMS order
    seeds: tuple[int, ...]
    runs: tuple[ArmRun, ...]
    tokens: dict[str, int]  # each evaluated client's held-out tokens: the weights of an overall loss
    personalization: str  # personalize.method ("none" when off)
    budget: dict[str, str]  # per arm, its training budget in words (steps, examples, per client)

    def run(self, arm: str, seed: int) -> ArmRun:
        return next(r for r in self.runs if r.arm == arm and r.seed == seed)

    def of(self, arm: str) -> list[ArmRun]:
        """The arm's runs, in seed order."""
        return [self.run(arm, seed) for seed in self.seeds]
