"""Rich progress for `fedtune run`: round, client, loss, time left, and one line per finished round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


class RichObserver:
    """Implements `fedtune.simulation.Observer` on a rich progress bar over all local steps."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("starting", total=None)
        self.rounds = 0
        self.round_num = 0
        self.client_id = ""

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, rounds: int, total_steps: int) -> None:
        self.rounds = rounds
        self.progress.update(self.task, total=total_steps, description="evaluating")

    def client_started(self, round_num: int, client_id: str) -> None:
        self.round_num, self.client_id = round_num, client_id
        self.progress.update(self.task, description=self._describe(None))

    def step(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, description=self._describe(loss))

    def evaluating(self, round_num: int) -> None:
        self.progress.update(self.task, description=f"round {round_num}/{self.rounds} evaluating")

    def round_finished(self, row: dict[str, Any]) -> None:
        failed = row.get("failed_clients") or []
        self.console.print(
            f"round {row['round']:>3}/{self.rounds}  clients {row['clients']}"
            + (f" ({len(failed)} refused)" if failed else "")
            + f"  train loss {_fmt(row['train_loss'], '.4f')}"
            + f"  eval loss {_fmt(row['eval_loss'], '.4f')}"
            + f"  ppl {_fmt(row['eval_perplexity'], '.2f')}"
            + f"  {row['seconds']:.1f}s"
        )

    def _describe(self, loss: float | None) -> str:
        client = self.client_id if len(self.client_id) <= 28 else self.client_id[:25] + "..."
        text = f"round {self.round_num}/{self.rounds} · {client}"
        return text + (f" · loss {loss:.3f}" if loss is not None else "")
