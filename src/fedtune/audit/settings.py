"""The `[audit]` config section: the canaries of an empirical privacy audit, and its confidence.

Simulation only (`fedtune audit`, or `fedtune run` with `audit.enabled = true`); `fedtune server` refuses it,
since a deployment's clients are real and its server cannot plant any. A setting given while the audit is
off is refused, not ignored.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from fedtune.section import PositiveInt, Section


class AuditConfig(Section):
    """White-box canary clients (a one-run audit's epsilon lower bound) and black-box canary texts
    (exposure) planted in a simulated run."""

    enabled: bool = False
    # white-box: canary clients added to the population, each included (sends its fixed random direction
    # at norm canary_l2_norm) or not (sends a zero delta) by a seeded coin; m of Steinke et al. 2023
    canaries: PositiveInt = 64
    canary_l2_norm: float | None = Field(None, gt=0.0)  # default: privacy.clip_l2_norm (C)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)  # of the lower bound
    # the delta of the bound: under DP it is the accountant's (privacy.delta); with privacy off, default
    # 1 / population^1.1, the default privacy.delta of the same population
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    seed: int | None = Field(None, ge=0)  # the canaries' own streams; default: run.seed
    # black-box (Carlini et al. 2019, "The Secret Sharer"): texts "<text_prefix> <digits>", each inserted
    # (text_repeats times, into one seeded real client's training data) or not by a seeded coin, ranked
    # by the final model's loss among text_candidates other random numbers of as many digits
    text_canaries: int = Field(8, ge=0)
    text_prefix: str = Field(" my secret number is", min_length=1)
    text_digits: int = Field(6, ge=1, le=12)
    text_repeats: PositiveInt = 4
    text_candidates: PositiveInt = 999

    @model_validator(mode="after")
    def _on_or_default(self) -> AuditConfig:
        if not self.enabled:
            default = AuditConfig.model_construct()
            given = [k for k in type(self).model_fields if getattr(self, k) != getattr(default, k)]
            if given:
                raise ValueError(
                    f"audit.{given[0]} is set but audit.enabled is false: run `fedtune audit` (or set "
                    "audit.enabled = true), or remove it"
                )
        if self.text_candidates >= 10**self.text_digits:
            raise ValueError(
                f"audit.text_candidates = {self.text_candidates} needs more than 10^{self.text_digits} "
                f"numbers of audit.text_digits = {self.text_digits} digits; raise text_digits or lower "
                "text_candidates"
            )
        return self
