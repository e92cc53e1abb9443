"""The run report: `report.md` with summary, headline, per-round and per-client tables, and plots.

Formatting is pure (rows in, Markdown lines out); only `write_report` touches the disk. Plots use
`matplotlib.figure.Figure` on an Agg canvas, never pyplot, so importing this module configures no
global backend and every figure is freed once written. Missing values (None) show as "–" in tables
and are left out of plots and counts. Above 40 clients the per-client plot turns from grouped bars
into a before/after scatter; above 25 clients the per-client table keeps the 10 most and 10 least
improved. A run on the simulated clock (rows with `simulated_seconds_total`) also gets `time.png`: eval
loss against simulated seconds (time-to-accuracy), and a column of each round's simulated seconds.
The public helpers (`fmt`, `fmt_mb`, `finite`, `markdown_table`, `save_figure`) also serve
`fedtune.compare.report`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DASH = "–"
MAX_BAR_CLIENTS = 40  # above this, clients.png is a scatter of before vs after
MAX_TABLE_CLIENTS = 25  # above this, the client table keeps the best and worst SHOW_CLIENTS
SHOW_CLIENTS = 10
MAX_LABEL_CHARS = 12


def fmt(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or a dash when it is missing."""
    return DASH if value is None else format(value, spec)


def fmt_mb(num_bytes: float | None) -> str:
    """Bytes as decimal megabytes: two decimals from 1 MB, three significant digits below."""
    if num_bytes is None:
        return DASH
    mb = num_bytes / 1e6
    return f"{mb:,.2f}" if mb >= 1 else f"{mb:.3g}"


def finite(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, NaN or infinite."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table's lines; cells are escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]


def _tick_labels(client_ids: list[str], limit: int = MAX_LABEL_CHARS) -> list[str]:
    """Short tick labels: the most specific part of each id (after its last '/') when those stay
    distinct, else the ids less the prefix they all share; long labels are cut with an ellipsis."""
    if all(len(cid) <= limit for cid in client_ids):
        return client_ids
    tails = [cid.rsplit("/", 1)[-1] for cid in client_ids]
    if all("/" in cid for cid in client_ids) and len(set(tails)) == len(tails) and all(tails):
        labels = tails
    else:
        lo, hi = min(client_ids), max(client_ids)  # the shared prefix of all ids is theirs
        pairs = zip(lo, hi, strict=False)
        shared = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(lo), len(hi)))
        cut = max((i + 1 for i, ch in enumerate(lo[:shared]) if not ch.isalnum()), default=0)
        if any(len(cid) == cut for cid in client_ids):
            cut = 0
        labels = [("…" if cut else "") + cid[cut:] for cid in client_ids]
    return [label if len(label) <= limit else label[: limit - 1] + "…" for label in labels]


def _client_changes(
    client_eval: dict[str, dict[str, float]],
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(client, before, after, after - before), most improved first; incomparable clients last."""
    out = []
    for cid, losses in client_eval.items():
        before, after = finite(losses.get("before")), finite(losses.get("after"))
        change = None if before is None or after is None else after - before
        out.append((cid, before, after, change))
    return sorted(out, key=lambda c: (c[3] is None, c[3] or 0.0))


def _percent_change(before: float, after: float) -> float | None:
    """Relative change in percent, or None when it is undefined."""
    if finite(before) in (None, 0.0) or finite(after) is None:
        return None
    return 100 * (after - before) / before


def headline(rows: list[dict[str, Any]], client_eval: dict[str, dict[str, float]]) -> str:
    """One sentence: eval perplexity first -> last evaluated round, and clients improved."""
    evaluated = [r for r in rows if r.get("eval_perplexity") is not None]
    if not evaluated:
        text = "No round was evaluated."
    else:
        first, last = evaluated[0], evaluated[-1]
        before, after = first["eval_perplexity"], last["eval_perplexity"]
        text = f"Eval perplexity {before:,.2f} (round {first.get('round')})"
        if last is not first:
            text += f" → {after:,.2f} (round {last.get('round')})"
            change = _percent_change(before, after)
            if change is not None:
                text += f", {change:+.1f}%"
        text += "."
    changes = _client_changes(client_eval)
    improved = sum(1 for *_, change in changes if change is not None and change < 0)
    text += f" {improved} of {len(changes)} clients improved their eval loss."
    personal = next((r for r in reversed(rows) if r.get("personal_eval_loss") is not None), None)
    if personal is not None:
        pairs = [(finite(v.get("personal")), finite(v.get("after"))) for v in client_eval.values()]
        better = sum(1 for own, glob in pairs if own is not None and glob is not None and own < glob)
        text += (
            f" Personal adapters: eval loss {personal['personal_eval_loss']:.4f} against the global "
            f"adapter's {personal['eval_loss']:.4f}, lower for {better} of {len(pairs)} clients."
        )
    return text


def simulated(rows: list[dict[str, Any]]) -> bool:
    """The rows come from a run on the simulated clock."""
    return any(r.get("simulated_seconds_total") is not None for r in rows)


def round_table(rows: list[dict[str, Any]]) -> list[str]:
    """The per-round Markdown table; a `failed` column appears when rows record failed clients, a
    `simulated s` column on the simulated clock."""
    show_failed = any("failed_clients" in r for r in rows)
    show_simulated = simulated(rows)
    header = ["round", "clients", "train loss", "eval loss", "eval perplexity"]
    header += ["MB up", "MB down", "seconds"] + (["simulated s"] if show_simulated else [])
    if show_failed:
        header.insert(2, "failed")
    body = []
    for r in rows:
        cells = [
            fmt(r.get("round"), "d"),
            fmt(r.get("clients"), "d"),
            fmt(r.get("train_loss"), ".4f"),
            fmt(r.get("eval_loss"), ".4f"),
            fmt(r.get("eval_perplexity"), ",.2f"),
            fmt_mb(r.get("bytes_up")),
            fmt_mb(r.get("bytes_down")),
            fmt(r.get("seconds"), ".1f"),
        ]
        if show_simulated:
            cells.append(fmt(r.get("simulated_seconds"), ",.1f"))
        if show_failed:
            failed = r.get("failed_clients")
            cells.insert(2, DASH if failed is None else str(len(failed)))
        body.append(cells)
    return markdown_table(header, body)


def client_table(client_eval: dict[str, dict[str, float]]) -> list[str]:
    """Per-client eval loss before/after (and with the client's personal adapter, when the run has
    them), most improved first; long lists keep both ends."""
    changes = _client_changes(client_eval)
    personal = any("personal" in losses for losses in client_eval.values())
    body = []
    for cid, b, a, c in changes:
        row = [cid, fmt(b, ".4f"), fmt(a, ".4f"), fmt(c, "+.4f")]
        if personal:
            own = finite(client_eval[cid].get("personal"))
            row += [fmt(own, ".4f"), fmt(None if own is None or a is None else own - a, "+.4f")]
        body.append(row)
    header = ["client", "before", "after", "change"]
    if personal:
        header += ["personal", "personal - after"]
    note = []
    if len(body) > MAX_TABLE_CLIENTS:
        body = [*body[:SHOW_CLIENTS], ["…"] + [""] * (len(header) - 1), *body[-SHOW_CLIENTS:]]
        note = [
            "",
            f"Showing the {SHOW_CLIENTS} most and {SHOW_CLIENTS} least improved of "
            f"{len(changes):,} clients; the plot above shows all of them.",
        ]
    return markdown_table(header, body) + note


def save_figure(fig: Figure, path: Path) -> None:
    """Render `fig` on an Agg canvas into `path` (a PNG); no global backend is touched."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for key, label, style in [("train_loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")]:
        points = [(r["round"], finite(r.get(key))) for r in rows if r.get("round") is not None]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_time(rows: list[dict[str, Any]], path: Path) -> None:
    """Eval loss against the run's simulated seconds: time-to-accuracy."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    points = [(finite(r.get("simulated_seconds_total")), finite(r.get("eval_loss"))) for r in rows]
    kept = [(x, y) for x, y in points if x is not None and y is not None]
    if kept:
        ax.plot(*zip(*kept, strict=True), "o-", label="eval loss")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no evaluated rounds", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_clients(client_eval: dict[str, dict[str, float]], path: Path) -> None:
    changes = sorted(_client_changes(client_eval), key=lambda c: c[0])
    improved = sum(1 for *_, change in changes if change is not None and change < 0)
    title = f"{improved} of {len(changes)} clients improved"
    if len(changes) <= MAX_BAR_CLIENTS:
        width = max(6.0, min(16.0, 2 + 0.35 * len(changes)))
        fig = Figure(figsize=(width, 4), layout="constrained")
        ax = fig.add_subplot()
        xs = range(len(changes))
        nan = float("nan")
        for offset, index, label in [(-0.2, 1, "before"), (0.2, 2, "after")]:
            heights = [nan if c[index] is None else c[index] for c in changes]
            ax.bar([x + offset for x in xs], heights, width=0.4, label=label)
        ax.set_xticks(list(xs), _tick_labels([c[0] for c in changes]), rotation=60, ha="right")
        ax.set_xlabel("client")
        ax.set_ylabel("eval loss")
        ax.margins(y=0.15)  # room for the legend above the bars
        if changes:
            ax.legend(loc="upper center", ncols=2)
    else:
        fig = Figure(figsize=(5.5, 5.5), layout="constrained")
        ax = fig.add_subplot()
        pairs = [(c[1], c[2]) for c in changes if c[3] is not None]
        if pairs:
            before, after = zip(*pairs, strict=True)
            ax.scatter(before, after, s=10, alpha=0.6)
            low, high = min(*before, *after), max(*before, *after)
            ax.plot([low, high], [low, high], "k--", linewidth=1, label="y = x (no change)")
            pad = 0.05 * (high - low) or 0.1
            ax.set_xlim(low - pad, high + pad)
            ax.set_ylim(low - pad, high + pad)
            ax.set_aspect("equal")
            ax.legend()
        ax.set_xlabel("eval loss before")
        ax.set_ylabel("eval loss after")
        title += " (below the line)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_report(
    run_dir: Path,
    rows: list[dict[str, Any]],
    client_eval: dict[str, dict[str, float]],
    *,
    title: str,
    summary: dict[str, str],
) -> Path:
    """Write `report.md`, `loss.png`, `clients.png` (and `time.png` on the simulated clock) into
    `run_dir`; return the report's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _plot_loss(rows, run_dir / "loss.png")
    if simulated(rows):
        _plot_time(rows, run_dir / "time.png")
    _plot_clients(client_eval, run_dir / "clients.png")
    lines = [f"# {title}", ""]
    if summary:
        lines += [*markdown_table(["", ""], [[k, v] for k, v in summary.items()]), ""]
    lines += [headline(rows, client_eval), "", "## Rounds", "", *round_table(rows), ""]
    lines += ["![train and eval loss per round](loss.png)", ""]
    if simulated(rows):
        lines += ["![eval loss against simulated seconds (time-to-accuracy)](time.png)", ""]
    lines += ["## Clients", ""]
    lines += ["![per-client eval loss before and after](clients.png)", ""]
    lines += [*client_table(client_eval), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
