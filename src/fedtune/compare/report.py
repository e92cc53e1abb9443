"""The files of `fedtune compare`: `compare.json`, `report.md`, `arms.png` and `clients.png`.

I/O at the edge: every number comes from `verdict.summarize`; this module only formats and writes.
`compare.json` is strict JSON (NaN and infinities become null, `allow_nan=False` guarantees it) with
the comparison's runs, tokens, budgets, seeds and arms, the verdict's numbers and its sentences.
Plots use matplotlib's `Figure` on an Agg canvas, never pyplot. A missing arm is left out of every
table and plot: `clients.png` needs the local-only arm and the federated or personalized one, and
says so on the figure when they are missing. `arms.png` starts its y-axis near the lowest bar, so
differences of a few hundredths stay visible; its bars are labelled with their values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedtune.compare.results import Comparison
from fedtune.compare.verdict import Verdict, arm_title, verdict_lines
from fedtune.jsonstate import json_safe
from fedtune.report import DASH, finite, fmt, fmt_mb, markdown_table, save_figure

CHECK = "✓"


def comparison_json(comparison: Comparison, verdict: Verdict) -> dict[str, Any]:
    """Everything `compare.json` holds, as strict-JSON-ready values."""
    return json_safe(
        {
            "name": comparison.name,
            "arms": comparison.arms,
            "seeds": comparison.seeds,
            "personalization": comparison.personalization,
            "tokens": comparison.tokens,
            "budget": comparison.budget,
            "runs": [dataclasses.asdict(r) for r in comparison.runs],
            "verdict": dataclasses.asdict(verdict),
            "verdict_lines": verdict_lines(verdict),
        }
    )


def _loss(value: float, std: float, seeds: int) -> str:
    if finite(value) is None:
        return DASH
    return f"{value:.4f}" if seeds == 1 else f"{value:.4f} ± {fmt(finite(std), '.4f')}"


def arms_table(verdict: Verdict) -> list[str]:
    """One row per arm: mean ± std eval loss, perplexity, steps, examples, MB moved, seconds, epsilon."""
    header = ["arm", "eval loss", "perplexity", "steps", "examples", "MB moved", "seconds", "epsilon"]
    body = [
        [
            f"**{title}**" if s.arm == verdict.best_arm else title,
            _loss(s.loss, s.loss_std, len(verdict.seeds)),
            fmt(finite(s.perplexity), ",.2f"),
            fmt(finite(s.steps), ",.0f"),
            fmt(finite(s.examples), ",.0f"),
            fmt_mb(s.bytes_moved),
            fmt(finite(s.seconds), ",.1f"),
            fmt(s.epsilon, ".2f"),
        ]
        for s in verdict.stats
        for title in [arm_title(s.arm, verdict.personalization)]
    ]
    return markdown_table(header, body)


def budget_lines(comparison: Comparison) -> list[str]:
    """Each arm's training budget in words, one bullet per arm, so a reader can check they match."""
    arms = [*comparison.arms, *(a for a in comparison.budget if a not in comparison.arms)]
    titles = {a: arm_title(a, comparison.personalization) for a in arms}
    return [f"- **{titles[a]}**: {comparison.budget.get(a, DASH)}" for a in arms]


def client_table(comparison: Comparison, verdict: Verdict) -> list[str]:
    """Per client: held-out tokens, each arm's loss (mean over seeds), ✓ where federated < local."""
    arms = [s.arm for s in verdict.stats]
    mark = "federated" in arms and "local" in arms
    header = ["client", "tokens", *(arm_title(a, verdict.personalization) for a in arms)]
    header += ["federated < local"] if mark else []
    body = []
    for cid in verdict.clients:
        losses = verdict.per_client[cid]
        row = [cid, fmt(comparison.tokens.get(cid), ",d")]
        row += [fmt(finite(losses.get(a)), ".4f") for a in arms]
        if mark:
            fed, local = losses.get("federated"), losses.get("local")
            row.append(CHECK if fed is not None and local is not None and fed < local else "")
        body.append(row)
    return markdown_table(header, body)


def plot_arms(verdict: Verdict, path: Path) -> None:
    """A bar per arm: mean overall eval loss, std error bars, the y-axis starting near the lowest."""
    fig = Figure(figsize=(max(5.0, 1.4 * len(verdict.stats) + 1), 4), layout="constrained")
    ax = fig.add_subplot()
    shown = [s for s in verdict.stats if finite(s.loss) is not None]
    if shown:
        stds = [finite(s.loss_std) or 0.0 for s in shown]
        xs = range(len(shown))
        ax.bar(xs, [s.loss for s in shown], yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        for x, s, std in zip(xs, shown, stds, strict=True):
            ax.annotate(
                f"{s.loss:.3f}", (x, s.loss + std), xytext=(0, 4), textcoords="offset points",
                ha="center", va="bottom", fontsize=9,
            )  # fmt: skip
        low = min(s.loss - d for s, d in zip(shown, stds, strict=True))
        high = max(s.loss + d for s, d in zip(shown, stds, strict=True))
        pad = 0.25 * (high - low) or 0.05 * abs(high) or 0.1
        ax.set_ylim(low - pad, high + pad)
        ax.set_xticks(
            list(xs), [arm_title(s.arm, verdict.personalization) for s in shown], rotation=20, ha="right"
        )
    else:
        ax.text(0.5, 0.5, "no finite losses", ha="center", va="center", transform=ax.transAxes)
    seeds = len(verdict.seeds)
    ax.set_ylabel("eval loss" + ("" if seeds == 1 else f" (mean ± std over {seeds} seeds)"))
    ax.set_title("eval loss per arm (lower is better)")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def plot_clients(verdict: Verdict, path: Path) -> None:
    """Per client: local-only loss (x) against federated and personalized loss (y); below y = x, the
    federated arm beats training alone."""
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    series = [
        ("federated", "o", "federated"),
        ("personalized", "^", arm_title("personalized", verdict.personalization)),
    ]
    xs_all: list[float] = []
    for arm, marker, label in series:
        points = [
            (finite(losses.get("local")), finite(losses.get(arm))) for losses in verdict.per_client.values()
        ]
        kept = [(x, y) for x, y in points if x is not None and y is not None]
        if kept:
            x, y = zip(*kept, strict=True)
            ax.scatter(x, y, marker=marker, s=24, alpha=0.7, label=f"{label} vs local-only")
            xs_all += [*x, *y]
    if xs_all:
        low, high = min(xs_all), max(xs_all)
        pad = 0.05 * (high - low) or 0.1
        ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", linewidth=1, label="y = x")
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_aspect("equal")
        ax.legend(loc="best")
    else:
        note = "needs the local-only arm and the federated or personalized one"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, wrap=True)
    share = verdict.federated_beats_local
    title = "per-client eval loss (below the line: federation helps)"
    if share is not None:
        title = f"federated beats local-only for {share.wins} of {share.clients} clients\n(below the line)"
    ax.set_title(title)
    ax.set_xlabel("local-only eval loss")
    personal = any("personalized" in losses for losses in verdict.per_client.values())
    ax.set_ylabel("federated" + (" or personalized" if personal else "") + " eval loss")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def report_lines(comparison: Comparison, verdict: Verdict) -> list[str]:
    """The lines of `report.md`."""
    seeds = ", ".join(str(s) for s in comparison.seeds)
    lines = [f"# fedtune compare `{comparison.name}`", ""]
    lines += [*(f"- {line}" for line in verdict_lines(verdict)), ""]
    lines += ["## Arms", "", *arms_table(verdict), ""]
    lines += [
        f"Means over {_seeds(len(comparison.seeds))} ({seeds}); ± is the sample standard deviation over "
        "seeds; in bold, the trained arm with the lowest eval loss. Eval loss is token-weighted over the "
        "evaluated clients' held-out examples.",
        "",
        "![mean eval loss per arm](arms.png)",
        "",
    ]
    lines += ["## Budgets", "", *budget_lines(comparison), ""]
    lines += ["## Clients", "", "![per-client eval loss, federated against local-only](clients.png)", ""]
    lines += [*client_table(comparison, verdict), ""]
    return lines


def write_comparison(folder: Path, comparison: Comparison, verdict: Verdict) -> None:
    """Write `compare.json`, `report.md`, `arms.png` and `clients.png` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(comparison_json(comparison, verdict), indent=2, allow_nan=False, ensure_ascii=False)
    (folder / "compare.json").write_text(text + "\n", encoding="utf-8")
    plot_arms(verdict, folder / "arms.png")
    plot_clients(verdict, folder / "clients.png")
    (folder / "report.md").write_text("\n".join(report_lines(comparison, verdict)), encoding="utf-8")
