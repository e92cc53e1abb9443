"""The run report on synthetic rounds with known answers: headline numbers, tables, plots."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from fedtune.report import _tick_labels, fmt_mb, headline, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MB = 1_000_000

# Eval perplexity 50 at round 0 and 25 at round 4, the last evaluated round: -50.0%.
ROWS = [
    {"round": 0, "clients": 0, "train_loss": None, "eval_loss": 3.912, "eval_perplexity": 50.0,
     "bytes_up": 0, "bytes_down": 0, "seconds": 1.5},
    {"round": 1, "clients": 3, "failed_clients": ["d"], "failures": {"d": "nan loss"},
     "client_ids": ["a", "b", "c", "d"], "train_loss": 3.5, "eval_loss": None,
     "eval_perplexity": None, "bytes_up": 3 * MB, "bytes_down": 4 * MB, "seconds": 10.0},
    {"round": 2, "clients": 4, "failed_clients": [], "train_loss": 3.2, "eval_loss": 3.689,
     "eval_perplexity": 40.0, "bytes_up": 4 * MB, "bytes_down": 4 * MB, "seconds": 10.5},
    {"round": 3, "clients": 4, "failed_clients": [], "train_loss": 3.1, "eval_loss": None,
     "eval_perplexity": None, "bytes_up": 4 * MB, "bytes_down": 4 * MB, "seconds": 9.5},
    {"round": 4, "clients": 4, "failed_clients": [], "train_loss": 3.0, "eval_loss": 3.219,
     "eval_perplexity": 25.0, "bytes_up": 2_500_000, "bytes_down": 4 * MB, "seconds": 11.0},
    {"round": 5, "clients": 4, "failed_clients": [], "train_loss": 2.9, "eval_loss": None,
     "eval_perplexity": None, "bytes_up": 4 * MB, "bytes_down": 4 * MB, "seconds": 9.0},
]  # fmt: skip

# a and c improve, b gets worse, d stays the same: 2 of 4 improved.
CLIENTS = {
    "a": {"before": 3.0, "after": 2.0},
    "b": {"before": 3.0, "after": 3.5},
    "c": {"before": 2.0, "after": 1.0},
    "d": {"before": 2.0, "after": 2.0},
}


def _write(tmp_path: Path, rows=ROWS, clients=CLIENTS) -> str:
    path = write_report(
        tmp_path, rows, clients, title="test run", summary={"model": "tiny", "rounds": "5 x 4"}
    )
    assert path == tmp_path / "report.md"
    return path.read_text(encoding="utf-8")


def _section_table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after `heading`, header and rule removed."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return table[2:]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_report_headline_uses_first_and_last_evaluated_rounds(tmp_path: Path) -> None:
    text = _write(tmp_path)
    assert text.startswith("# test run\n")
    assert "Eval perplexity 50.00 (round 0) → 25.00 (round 4), -50.0%." in text
    assert "2 of 4 clients improved" in text
    assert "| model | tiny |" in text
    # Order: summary, headline, rounds, images, per-client table.
    order = ["| model |", "Eval perplexity", "## Rounds", "(loss.png)", "(clients.png)", "| a |"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)


def test_round_table_has_one_line_per_round_and_dashes_for_missing(tmp_path: Path) -> None:
    table = _section_table(_write(tmp_path), "## Rounds")
    assert [row[0] for row in table] == [str(r["round"]) for r in ROWS]
    # round, clients, failed, train loss, eval loss, eval ppl, MB up, MB down, seconds
    assert table[0] == ["0", "0", "–", "–", "3.9120", "50.00", "0", "0", "1.5"]
    assert table[1] == ["1", "3", "1", "3.5000", "–", "–", "3.00", "4.00", "10.0"]
    assert table[4][6] == "2.50"


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    _write(tmp_path)
    for name in ["loss.png", "clients.png"]:
        path = tmp_path / name
        assert path.stat().st_size > 0
        _png_size(path)


def test_a_run_on_the_simulated_clock_gets_a_time_to_accuracy_plot(tmp_path: Path) -> None:
    assert not (tmp_path / "time.png").exists()
    total = 0.0
    rows = []
    for r in ROWS:
        step = 0.0 if r["round"] == 0 else 30.0 + r["round"]
        total += step
        rows.append({**r, "simulated_seconds": step, "simulated_seconds_total": total})
    text = _write(tmp_path / "timed", rows=rows)
    _png_size(tmp_path / "timed" / "time.png")
    assert "](time.png)" in text and "time-to-accuracy" in text
    table = _section_table(text, "## Rounds")
    assert [row[9] for row in table] == ["0.0", "31.0", "32.0", "33.0", "34.0", "35.0"]
    assert "time.png" not in _write(tmp_path / "plain")


def test_per_client_table_sorted_by_change(tmp_path: Path) -> None:
    table = _section_table(_write(tmp_path), "## Clients")
    assert [row[0] for row in table] == ["a", "c", "d", "b"]
    assert table[0] == ["a", "3.0000", "2.0000", "-1.0000"]
    assert table[-1] == ["b", "3.0000", "3.5000", "+0.5000"]


def test_many_clients_table_keeps_ten_best_and_ten_worst(tmp_path: Path) -> None:
    # Client cNN changes by (NN - 10) / 100: c00 improves most, c29 least; c00-c09 improve.
    clients = {f"c{i:02d}": {"before": 3.0, "after": 3.0 + (i - 10) / 100} for i in range(30)}
    text = _write(tmp_path, clients=clients)
    names = [row[0] for row in _section_table(text, "## Clients")]
    assert names == [f"c{i:02d}" for i in range(10)] + ["…"] + [f"c{i:02d}" for i in range(20, 30)]
    assert "10 most and 10 least improved of 30 clients" in text
    assert "10 of 30 clients improved" in text


def test_many_clients_plot_is_a_scatter(tmp_path: Path) -> None:
    clients = {
        f"client-{i:04d}": {"before": 3.0 + i % 7 / 10, "after": 2.5 + i % 11 / 10} for i in range(1000)
    }
    clients["client-0001"] = {"before": 3.0, "after": None}  # a client whose eval failed
    text = _write(tmp_path, clients=clients)
    width, height = _png_size(tmp_path / "clients.png")
    assert width == height  # the square scatter, not the wide bar chart
    assert "of 1000 clients improved" in text
    assert "of 1,000 clients; the plot above shows all of them" in text


def test_few_clients_plot_is_a_bar_chart(tmp_path: Path) -> None:
    _write(tmp_path)
    width, height = _png_size(tmp_path / "clients.png")
    assert width > height


def test_headline_without_evaluation_or_with_a_single_one() -> None:
    assert headline([], {}) == "No round was evaluated. 0 of 0 clients improved their eval loss."
    single = headline(ROWS[:2], {"a": {"before": 2.0, "after": 1.5}})
    assert single == "Eval perplexity 50.00 (round 0). 1 of 1 clients improved their eval loss."


def test_small_formatters() -> None:
    assert fmt_mb(None) == "–"
    assert fmt_mb(1_234_567) == "1.23"
    assert fmt_mb(1_234_567_890) == "1,234.57"
    assert fmt_mb(12_345) == "0.0123"
    assert _tick_labels(["a", "b"]) == ["a", "b"]
    assert _tick_labels(["shakespeare_ROMEO", "shakespeare_JULIET"]) == ["…ROMEO", "…JULIET"]
    assert _tick_labels(["a-very-long-client-id", "b"]) == ["a-very-long…", "b"]
    assert _tick_labels(["macbeth/MACBETH", "king-lear/EDGAR"]) == ["MACBETH", "EDGAR"]
    # same character name in two plays: fall back to the (cut) full ids, which stay distinct
    assert _tick_labels(["macbeth/MESSENGER", "king-lear/MESSENGER"]) == ["macbeth/MES…", "king-lear/M…"]


def test_import_configures_no_pyplot() -> None:
    code = "import sys, fedtune.report; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
