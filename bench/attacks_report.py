"""bench/attacks.py's cells as tables and a heat map: the clean eval-loss change each attack causes under
each rule, against the no-attack FedAvg run, and the backdoor's success rate.

The change is over the attack run's honest clients, each client's held-out loss after the last round,
averaged over clients (the same clients in both runs), in percent of the no-attack run's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from statistics import mean

from bench.attacks import ATTACKS as KINDS
from bench.attacks import DECENTRAL_RULES, RULES

ATTACKS = [k for k in KINDS if k != "none"]


def load(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def attackers(cell: dict) -> set[str]:
    """The cell's attackers: recorded, or chosen again as the run chose them (seed 0; every client of the
    population is evaluated, so `per_client_after` names the population)."""
    if cell["attack"] == "none":
        return set()
    if "attackers" in cell:
        return set(cell["attackers"])
    from fedtune.attack import AttackConfig, choose_attackers

    cfg = AttackConfig(kind=cell["attack"], fraction=cell["fraction"])
    return set(choose_attackers(cfg, sorted(cell["per_client_after"]), 0))


def change(cell: dict, clean: dict) -> float:
    """Percent change of the honest clients' mean held-out loss against the no-attack run's."""
    bad = attackers(cell)
    honest = [c for c in cell["per_client_after"] if c not in bad]
    ours = mean(cell["per_client_after"][c]["after"] for c in honest)
    theirs = mean(clean["per_client_after"][c]["after"] for c in honest)
    return 100.0 * (ours - theirs) / theirs


def figure(cell: dict | None, clean: dict) -> str:
    """A cell's entry: the clean loss change; a backdoor's greedy success after it; the share of
    neighbour adapters BALANCE accepted over the run."""
    if cell is None:
        return "not run"
    text = f"{change(cell, clean):+.1f}%"
    if cell["attack"] == "backdoor" and cell["backdoor_success"] is not None:
        text += f" / {100 * cell['backdoor_success']:.0f}%"
    rates = [r for r in cell.get("acceptance_rate") or () if r is not None]
    if cell["rule"] == "balance" and rates:
        text += f" (accepts {100 * mean(rates):.0f}%)"
    return text


def grid(title: str, rules: list[str], rows: list[tuple[str, list[dict | None]]], clean: dict) -> list[str]:
    lines = [f"| {title} | " + " | ".join(rules) + " |", "| --- |" + " --- |" * len(rules)]
    return lines + [
        f"| {label} | " + " | ".join(figure(c, clean) for c in cells) + " |" for label, cells in rows
    ]


def table(cells: dict[str, dict], fraction: int, clean: dict) -> list[str]:
    rows = [(a, [cells.get(f"{fraction}-{a}-{r}") for r in RULES]) for a in ATTACKS]
    return grid(f"{fraction}% attackers", RULES, rows, clean)


def clean_row(cells: dict[str, dict], clean: dict) -> list[str]:
    return grid("rule's cost", RULES, [("no attack", [cells.get(f"0-none-{r}") for r in RULES])], clean)


def decentral_table(cells: dict[str, dict], fraction: int, clean: dict, suffix: str) -> list[str]:
    """BALANCE's sweep: per attack, gossip averaging against BALANCE, each the honest clients' loss change
    against the no-attack gossip run, the backdoor's success on the honest clients' own adapters, and the
    share of neighbour adapters accepted over the run."""

    def cell(attack: str, rule: str) -> dict | None:
        name = f"dec-0-none-{rule}" if attack == "none" else f"dec-{fraction}-{attack}-{rule}"
        return cells.get(name + (suffix if rule == "balance" else ""))

    rows = [
        ("no attack" if a == "none" else a, [cell(a, r) for r in DECENTRAL_RULES]) for a in ["none", *ATTACKS]
    ]
    return grid(f"{fraction}% attackers", DECENTRAL_RULES, rows, clean)


def heatmap(cells: dict[str, dict], clean: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fractions = sorted({int(c["cell"].split("-")[0]) for c in _star(cells).values()} - {0})
    fig, axes = plt.subplots(1, len(fractions), figsize=(6.5 * len(fractions), 4.6), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        grid = np.full((len(ATTACKS), len(RULES)), math.nan)
        for i, attack in enumerate(ATTACKS):
            for j, rule in enumerate(RULES):
                cell = cells.get(f"{fraction}-{attack}-{rule}")
                if cell is not None:
                    grid[i, j] = change(cell, clean)
        image = ax.imshow(np.clip(grid, -5, 50), cmap="Reds", vmin=-5, vmax=50, aspect="auto")
        for i in range(len(ATTACKS)):
            for j in range(len(RULES)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(RULES)), RULES, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(ATTACKS)), ATTACKS, fontsize=8)
        ax.set_title(f"{fraction}% attackers: clean loss change, % (clipped to 50)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _star(cells: dict[str, dict]) -> dict[str, dict]:
    return {name: cell for name, cell in cells.items() if not name.startswith("dec-")}


def report(results: Path, gamma: float | None = None) -> None:
    everything = load(results)
    cells = _star(everything)
    clean = cells.get("0-none-fedavg")
    if clean is None:
        raise SystemExit("run the no-attack FedAvg cell first: it is what every change is against")
    print(f"no-attack FedAvg: eval loss {clean['eval_loss_before']:.4f} -> {clean['eval_loss']:.4f}\n")
    sources = Counter(c.get("source") or "not recorded" for c in everything.values())
    print("cells by source commit: " + ", ".join(f"{k} {n}" for k, n in sorted(sources.items())) + "\n")
    control = cells.get("0-none-fedavg-seed1")
    if control is not None and set(control["per_client_after"]) == set(clean["per_client_after"]):
        print(f"control, no attack with run.seed = 1: {change(control, clean):+.2f}% (the noise floor)\n")
    print("\n".join(clean_row(cells, clean)))
    for fraction in sorted({int(c["cell"].split("-")[0]) for c in cells.values()} - {0}):
        print()
        print("\n".join(table(cells, fraction, clean)))
    heatmap(cells, clean, results.parent / "attacks-heatmap.png")
    print(f"\nheat map: {results.parent / 'attacks-heatmap.png'}")
    gossip = everything.get("dec-0-none-fedavg")
    if gossip is not None:
        suffix = "" if gamma is None else f"-g{gamma}"
        print(
            f"\ndecentralized, no attack, gossip: mean eval loss {gossip['eval_loss_before']:.4f} -> "
            f"{gossip['eval_loss']:.4f}; BALANCE cells {suffix or '(default gamma)'}"
        )
        fractions = {int(n.split("-")[1]) for n in everything if n.startswith("dec-")} - {0}
        for fraction in sorted(fractions):
            print()
            print("\n".join(decentral_table(everything, fraction, gossip, suffix)))
