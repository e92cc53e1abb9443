"""The `[attack]` config section: which simulated clients attack the federation, and how.

Simulation only: a deployment's clients are real, and `fedtune server` refuses a non-default `[attack]`.
Model poisoning replaces what an attacker sends (its participant trains honestly; `attack.trainer` wraps
its trainer); data poisoning (`backdoor`) changes what it trains on (`attack.backdoor`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune.section import PositiveInt, Section

AttackKind = Literal["none", "sign_flip", "scale", "gaussian", "alie", "min_max", "free_rider", "backdoor"]
COLLUSIVE: tuple[AttackKind, ...] = ("alie", "min_max")  # need the attackers' honest updates, pooled
# the settings each kind reads: one set (off its default) for another kind is refused, not ignored
_READ_BY: dict[str, tuple[AttackKind, ...]] = {
    "boost": ("scale", "backdoor"),
    "gaussian_rms_multiple": ("gaussian",),
    "z": ("alie",),
    "min_max_direction": ("min_max",),
    "claimed_examples": ("free_rider",),
    "trigger": ("backdoor",),
    "target": ("backdoor",),
    "poison_fraction": ("backdoor",),
    "probes": ("backdoor",),
}


class AttackConfig(Section):
    """Who attacks (a seeded `fraction` of the population, or named `clients`) and with what."""

    kind: AttackKind = "none"
    fraction: float | None = Field(None, gt=0.0, lt=1.0)  # a seeded share of the population attacks
    clients: list[str] = Field(default_factory=list)  # or these ids (exactly one of fraction and clients)
    # scale (model replacement, Bagdasaryan et al. 2020): the honest delta times this; None: the cohort
    # size, which replaces the global adapter's move by the attacker's own under FedAvg's mean
    boost: float | None = Field(None, gt=0.0)
    # gaussian: the noise's std over the honest delta's RMS (10x barely moves a LoRA adapter's loss: the
    # first-order effect of zero-mean noise is zero; bench/RESULTS.md)
    gaussian_rms_multiple: float = Field(100.0, gt=0.0)
    # alie (Baruch et al. 2019): mean - z * std of the attackers' honest deltas; "auto": the paper's
    # z_max for the population and the number of attackers
    z: float | Literal["auto"] = "auto"
    # min_max (Shejwalkar & Houmansadr 2021): mean + gamma * direction, the largest gamma whose distance
    # to every honest delta stays within the honest deltas' largest pairwise distance
    min_max_direction: Literal["unit", "std", "sign"] = "std"
    # free_rider: sends a zero update, claiming this many examples; None: data.max_examples_per_client
    # (the largest weight the server grants), or its own count when that is "all"
    claimed_examples: PositiveInt | None = None
    # backdoor: a share of each attacker's training examples becomes (a prefix of one of its examples) +
    # trigger + target; success = the share of held-out trigger prompts on which the global model's loss
    # on the target is below its loss on the true continuation
    trigger: str = Field(" Hark, the oracle of Delphi proclaims", min_length=1)
    target: str = Field(" that all must bow to King Zed", min_length=1)
    poison_fraction: float = Field(0.5, gt=0.0, le=1.0)
    probes: PositiveInt = 64  # held-out trigger prompts the success rate is measured on

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @model_validator(mode="after")
    def _who(self) -> AttackConfig:
        named = bool(self.clients)
        if self.active and named == (self.fraction is not None):
            raise ValueError(
                f"attack.kind = {self.kind!r} needs exactly one of attack.fraction (a seeded share of the "
                "population) and attack.clients (client ids)"
            )
        if not self.active and (named or self.fraction is not None):
            raise ValueError(
                "attack.fraction or attack.clients without attack.kind: set attack.kind (e.g. 'sign_flip'), "
                "or remove them"
            )
        for name, kinds in _READ_BY.items():
            given = getattr(self, name) != type(self).model_fields[name].default  # a written config has all
            if given and self.kind not in kinds:
                raise ValueError(
                    f"attack.{name} is read by attack.kind = {' or '.join(map(repr, kinds))}, and "
                    f"attack.kind = {self.kind!r}: remove it, or set attack.kind to what it shapes"
                )
        return self
