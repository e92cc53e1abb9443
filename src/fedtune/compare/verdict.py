"""The verdict of `fedtune compare`: each arm's statistics over seeds, and whether federation pays off.

Pure functions of a `Comparison`, no I/O. What is notable:
- An arm's loss is the mean over seeds of its overall (token-weighted) eval loss; its spread is the
  sample standard deviation over seeds (ddof=1), 0.0 with one seed.
- `recovered`, the share of centralized's gain that federation recovers, is computed per seed,
  (base - federated) / (base - centralized), then averaged. It is None when the base, centralized or
  federated arm is missing, or when centralized does not beat base in some seed: a share of no gain is
  undefined. It can fall below 0 (federation does worse than base) or exceed 1 (it beats pooling).
- Per-client comparisons use each client's loss averaged over seeds, over the clients that every arm
  compared evaluated. "Beats" is strict (<): a tie counts for the simpler arm.
- `simpler_wins` says, in words, where a simpler arm wins; nothing here is tuned toward a target.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import fmean

from fedtune.compare.results import ARM_TITLES, Comparison
from fedtune.evaluate import perplexity

UNTRAINED = ("base",)


@dataclass(frozen=True)
class ArmStats:
    """One arm over every seed."""

    arm: str
    loss: float  # mean over seeds of the overall eval loss
    loss_std: float  # sample std over seeds (ddof=1); 0.0 with one seed
    perplexity: float  # exp(loss): the perplexity of the mean loss
    per_client_loss: dict[str, float]  # each client's eval loss, mean over the seeds that evaluated it
    steps: float  # means over seeds from here on
    examples: float
    bytes_moved: float
    seconds: float
    epsilon: float | None  # mean over the seeds that report one; None when none does


@dataclass(frozen=True)
class Share:
    """For how many clients one arm's loss (mean over seeds) is below another's."""

    wins: int
    clients: int  # clients compared: those every arm in the comparison evaluated
    share: float  # wins / clients


@dataclass(frozen=True)
class Recovered:
    """(base - federated) / (base - centralized), per seed and over seeds."""

    mean: float
    std: float  # sample std over seeds (ddof=1); 0.0 with one seed
    per_seed: tuple[float, ...]  # in comparison.seeds order


@dataclass(frozen=True)
class Verdict:
    """Does federation pay off on these clients? The numbers behind `verdict_lines`."""

    name: str
    seeds: tuple[int, ...]
    personalization: str  # personalize.method ("none" when off)
    stats: tuple[ArmStats, ...]  # in comparison.arms order
    recovered: Recovered | None
    federated_beats_local: Share | None
    personalized_beats_local: Share | None
    personalized_beats_federated: Share | None
    personalized_beats_both: Share | None  # below both local-only and federated
    best_arm: str | None  # the trained arm with the lowest mean overall loss
    simpler_wins: tuple[str, ...]  # plain-English statements, empty when no simpler arm wins
    clients: tuple[str, ...]  # every evaluated client: comparison.tokens order, then any others
    per_client: dict[str, dict[str, float]]  # client -> arm -> mean loss over seeds

    def arm(self, arm: str) -> ArmStats | None:
        """The arm's statistics, or None when it was not run."""
        return next((s for s in self.stats if s.arm == arm), None)


def sample_std(values: list[float]) -> float:
    """Standard deviation with ddof=1; 0.0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def arm_stats(comparison: Comparison, arm: str) -> ArmStats:
    runs = comparison.of(arm)
    losses = [r.loss for r in runs]
    clients: dict[str, list[float]] = {}
    for r in runs:
        for cid, loss in r.per_client_loss.items():
            clients.setdefault(cid, []).append(loss)
    epsilons = [r.epsilon for r in runs if r.epsilon is not None]
    return ArmStats(
        arm=arm,
        loss=fmean(losses),
        loss_std=sample_std(losses),
        perplexity=perplexity(fmean(losses)),
        per_client_loss={cid: fmean(v) for cid, v in clients.items()},
        steps=fmean([float(r.steps) for r in runs]),
        examples=fmean([float(r.examples) for r in runs]),
        bytes_moved=fmean([float(r.bytes_moved) for r in runs]),
        seconds=fmean([r.seconds for r in runs]),
        epsilon=fmean(epsilons) if epsilons else None,
    )


def _recovered(comparison: Comparison) -> Recovered | None:
    if not {"base", "centralized", "federated"} <= set(comparison.arms):
        return None
    shares = []
    for seed in comparison.seeds:
        base = comparison.run("base", seed).loss
        gain = base - comparison.run("centralized", seed).loss
        if not gain > 0:  # also refuses NaN
            return None
        shares.append((base - comparison.run("federated", seed).loss) / gain)
    return Recovered(mean=fmean(shares), std=sample_std(shares), per_seed=tuple(shares))


def _share(winner: ArmStats | None, *losers: ArmStats | None) -> Share | None:
    """For how many clients `winner`'s loss is below that of every one of `losers`."""
    if winner is None or any(s is None for s in losers):
        return None
    others = [s for s in losers if s is not None]
    common = [c for c in winner.per_client_loss if all(c in s.per_client_loss for s in others)]
    if not common:
        return None
    wins = sum(1 for c in common if all(winner.per_client_loss[c] < s.per_client_loss[c] for s in others))
    return Share(wins=wins, clients=len(common), share=wins / len(common))


def arm_title(arm: str, personalization: str) -> str:
    """The arm's name in prose and tables: the personalized arm names its method."""
    if arm == "personalized" and personalization != "none":
        return f"personalized ({personalization})"
    return ARM_TITLES.get(arm, arm)


def _simpler_wins(
    by_arm: dict[str, ArmStats],
    recovered: Recovered | None,
    federated_beats_local: Share | None,
    personalization: str,
) -> list[str]:
    out = []
    central, federated = by_arm.get("centralized"), by_arm.get("federated")
    if central is not None and federated is not None:
        margin, spread = federated.loss - central.loss, federated.loss_std + central.loss_std
        if margin > spread:
            share = "an undefined share" if recovered is None else f"{recovered.mean:.0%}"
            out.append(
                f"Centralized beats federated by {margin:.3f} in eval loss ({central.loss:.3f} vs "
                f"{federated.loss:.3f}), more than their combined spread ({spread:.3f}): pooling the "
                f"data would do better; federation recovers {share} of its gain."
            )
    if federated_beats_local is not None:
        clients = federated_beats_local.clients
        alone = clients - federated_beats_local.wins  # local-only's loss <= federated's
        if alone > clients / 2:
            out.append(
                f"For {alone} of {clients} clients training alone does at least as well: "
                "federation does not pay for them."
            )
    base = by_arm.get("base")
    trained = [s for arm, s in by_arm.items() if arm not in UNTRAINED]
    if base is not None and trained and all(base.loss < s.loss for s in trained):
        best = min(trained, key=lambda s: s.loss)
        out.append(
            f"The base model ({base.loss:.3f}) beats every trained arm (best: "
            f"{arm_title(best.arm, personalization)}, {best.loss:.3f}): fine-tuning does not pay."
        )
    personal = by_arm.get("personalized")
    if federated is not None and personal is not None and federated.loss < personal.loss:
        out.append(
            f"Federated ({federated.loss:.3f}) beats {arm_title('personalized', personalization)} "
            f"({personal.loss:.3f}) overall: personalization does not pay."
        )
    return out


def summarize(comparison: Comparison) -> Verdict:
    """Every arm's statistics over seeds, the shares of clients each arm wins, and the verdict."""
    stats = tuple(arm_stats(comparison, arm) for arm in comparison.arms)
    by_arm = {s.arm: s for s in stats}
    local, federated = by_arm.get("local"), by_arm.get("federated")
    personal = by_arm.get("personalized")
    recovered = _recovered(comparison)
    federated_beats_local = _share(federated, local)
    trained = [s for s in stats if s.arm not in UNTRAINED and math.isfinite(s.loss)]
    seen = {c for s in stats for c in s.per_client_loss}
    clients = [c for c in comparison.tokens if c in seen]
    clients += sorted(seen - set(clients))
    return Verdict(
        name=comparison.name,
        seeds=comparison.seeds,
        personalization=comparison.personalization,
        stats=stats,
        recovered=recovered,
        federated_beats_local=federated_beats_local,
        personalized_beats_local=_share(personal, local),
        personalized_beats_federated=_share(personal, federated),
        personalized_beats_both=_share(personal, local, federated),
        best_arm=min(trained, key=lambda s: s.loss).arm if trained else None,
        simpler_wins=tuple(
            _simpler_wins(by_arm, recovered, federated_beats_local, comparison.personalization)
        ),
        clients=tuple(clients),
        per_client={
            c: {s.arm: s.per_client_loss[c] for s in stats if c in s.per_client_loss} for c in clients
        },
    )


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"mean of {n} seeds"


def _count(share: Share, noun: str = "") -> str:
    return f"{share.wins} of {share.clients}{noun} ({share.share:.0%})"


def _recovered_line(verdict: Verdict) -> str | None:
    base, central = verdict.arm("base"), verdict.arm("centralized")
    federated = verdict.arm("federated")
    if federated is None:
        return None
    seeds = _seeds(len(verdict.seeds))
    r = verdict.recovered
    if r is not None and base is not None and central is not None:
        spread = "" if len(verdict.seeds) == 1 else f" (± {r.std:.0%})"
        return (
            f"Federation recovers {r.mean:.0%}{spread} of centralized's gain in eval loss: base "
            f"{base.loss:.3f} → federated {federated.loss:.3f}, centralized {central.loss:.3f} ({seeds})."
        )
    if base is None or central is None:
        missing = " and ".join(a for a, s in (("base", base), ("centralized", central)) if s is None)
        return (
            f"Federated eval loss {federated.loss:.3f} ({seeds}); with no {missing} arm, the share of "
            "pooling's gain that federation recovers is not measured."
        )
    return (
        f"Centralized does not beat the base model in every seed (base {base.loss:.3f}, centralized "
        f"{central.loss:.3f}, {seeds}): there is no gain for federation to recover, so none is reported."
    )


def verdict_lines(verdict: Verdict) -> list[str]:
    """The verdict in plain words with its numbers, one sentence per line."""
    lines = []
    recovered = _recovered_line(verdict)
    if recovered is not None:
        lines.append(recovered)
    if verdict.federated_beats_local is not None:
        lines.append(f"Federated beats local-only for {_count(verdict.federated_beats_local, ' clients')}.")
    parts = [
        (label, share)
        for label, share in (
            ("local-only", verdict.personalized_beats_local),
            ("federated", verdict.personalized_beats_federated),
            ("both", verdict.personalized_beats_both),
        )
        if share is not None
    ]
    if parts:
        said = [
            f"{label} for {_count(share, ' clients' if i == 0 else '')}"
            for i, (label, share) in enumerate(parts)
        ]
        title = arm_title("personalized", verdict.personalization)
        lines.append(f"{title[0].upper()}{title[1:]} beats {', '.join(said)}.")
    best = verdict.arm(verdict.best_arm) if verdict.best_arm is not None else None
    if best is not None:
        spread = "" if len(verdict.seeds) == 1 else f" ± {best.loss_std:.3f}"
        lines.append(
            f"Lowest eval loss of the trained arms: {arm_title(best.arm, verdict.personalization)}, "
            f"{best.loss:.3f}{spread}."
        )
    lines += list(verdict.simpler_wins) or ["No simpler arm wins."]
    return lines
