"""What an audit found, as `audit.json` and as the report's "Audit" section: the empirical lower bound next
to the accountant's epsilon.

The headline bound is at the accountant's delta, the claim a DP run makes; the delta = 0 bound beside it
refutes only a pure-DP claim (an (eps, delta)-DP run may exceed it with probability about 2 m delta), and
the two differ most when 2 m delta is not small. With privacy off there is no accountant, and the bound
says how much a run without noise leaks to this auditor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedtune.audit.bound import OneRunAudit
from fedtune.audit.exposure import Exposures


@dataclass(frozen=True)
class AuditResult:
    white_box: OneRunAudit  # at the accountant's delta (privacy off: audit.delta)
    pure_epsilon: float  # the delta = 0 bound of the same scores
    accounted_epsilon: float | None  # None: privacy off
    accounted_epsilon_known_cohort: float | None
    delta: float
    included_score_mean: float
    excluded_score_mean: float
    exposures: Exposures | None

    @property
    def exceeds_accountant(self) -> bool:
        """The empirical bound above the accounted epsilon: the DP code (or its accounting) is wrong, or
        a (1 - confidence) event happened."""
        return self.accounted_epsilon is not None and self.white_box.epsilon > self.accounted_epsilon

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epsilon_lower_bound": self.white_box.epsilon,
            "epsilon_lower_bound_pure": self.pure_epsilon,
            "accounted_epsilon": self.accounted_epsilon,
            "accounted_epsilon_known_cohort": self.accounted_epsilon_known_cohort,
            "delta": self.delta,
            "exceeds_accountant": self.exceeds_accountant,
            "white_box": asdict(self.white_box),
            "included_score_mean": self.included_score_mean,
            "excluded_score_mean": self.excluded_score_mean,
        }
        if self.exposures is not None:
            e = self.exposures
            row["black_box"] = {
                "candidates": e.candidates,
                "max_possible_exposure": e.max_possible,
                "inserted": list(e.inserted),
                "controls": list(e.controls),
                **_stats("inserted", e.inserted),
                **_stats("controls", e.controls),
            }
        return row

    def lines(self) -> list[str]:
        """The report's "Audit" section (Markdown)."""
        w = self.white_box
        accounted = "privacy off" if self.accounted_epsilon is None else f"{self.accounted_epsilon:.3g}"
        out = [
            "## Audit",
            "",
            f"Empirical privacy, one run (Steinke, Nasr and Jagielski 2023): {w.canaries} canary clients, "
            f"{w.included} included by a coin; the auditor guessed the {w.guesses} highest-scoring canaries "
            f"included, {w.correct} correctly (best of {w.thresholds} thresholds, Bonferroni).",
            "",
            "| | epsilon |",
            "| --- | --- |",
            f"| lower bound at {w.confidence:.0%} confidence, delta {self.delta:.3g} | {w.epsilon:.3f} |",
            f"| lower bound, delta 0 (against a pure-DP claim) | {self.pure_epsilon:.3f} |",
            f"| accountant, delta {self.delta:.3g} | {accounted} |",
        ]
        if self.accounted_epsilon_known_cohort is not None:
            out.append(
                f"| accountant, cohort known (no amplification) | {self.accounted_epsilon_known_cohort:.3g} |"
            )
        out += [
            "",
            f"Mean cosine with the adapter's change: included {self.included_score_mean:.4f}, "
            f"excluded {self.excluded_score_mean:.4f}.",
        ]
        if self.exceeds_accountant:
            out += [
                "",
                "**The lower bound exceeds the accounted epsilon: the DP code or its accounting is wrong.**",
            ]
        if 2 * w.canaries * self.delta > 0.1:
            out += [
                "",
                f"2 m delta = {2 * w.canaries * self.delta:.2g}: at this delta the bound is weak; a smaller "
                "privacy.delta (or audit.delta) gives the audit more power.",
            ]
        if self.exposures is not None:
            e = self.exposures
            out += [
                "",
                f"Exposure of canary texts (Carlini et al. 2019), among {e.candidates} random candidates "
                f"(at most {e.max_possible:.2f} bits):",
                "",
                "| canaries | count | mean exposure | max exposure |",
                "| --- | --- | --- | --- |",
                _row("inserted", e.inserted),
                _row("not inserted", e.controls),
            ]
        out += [
            "",
            "A lower bound is evidence, not a guarantee: a bound well below the accounted epsilon means this "
            "auditor learned little, not that the run is more private than accounted.",
            "",
        ]
        return out


def _stats(name: str, values: tuple[float, ...]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_mean": None, f"{name}_max": None}
    return {f"{name}_mean": float(np.mean(values)), f"{name}_max": float(np.max(values))}


def _row(name: str, values: tuple[float, ...]) -> str:
    if not values:
        return f"| {name} | 0 | – | – |"
    return f"| {name} | {len(values)} | {np.mean(values):.2f} | {np.max(values):.2f} |"
