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

from fedtune.round.results import RoundResult
from fedtune.round.transport import Phase


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def round_line(result: RoundResult, rounds: int) -> str:
    """One line per finished round, the same for `fedtune run` and `fedtune server`."""
    ev = result.eval
    line = (
        f"round {result.round_num:>3}/{rounds}  clients {result.clients}/{result.selected}"
        + (f" ({len(result.failures)} refused)" if result.failures else "")
        + (f" ({len(result.stragglers)} stragglers)" if result.stragglers else "")
        + f"  train loss {_fmt(result.train_loss, '.4f')}"
        + f"  eval loss {_fmt(None if ev is None else ev.loss, '.4f')}"
        + f"  ppl {_fmt(None if ev is None else ev.perplexity, '.2f')}"
        + f"  {result.bytes_up / 1e6:.2f} MB up  {result.seconds:.1f}s"
    )
    return line + (f"  FAILED: {result.failed}" if result.failed else "")


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
        self.progress.update(self.task, total=total_steps, completed=0, description="evaluating")

    def working(self, round_num: int, client_id: str, phase: Phase) -> None:
        self.round_num, self.client_id = round_num, client_id
        if phase == Phase.EVALUATE:
            self.progress.update(self.task, description=f"round {round_num}/{self.rounds} evaluating")
        else:
            self.progress.update(self.task, description=self._describe(None))

    def step(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, description=self._describe(loss))

    def round_finished(self, result: RoundResult) -> None:
        self.console.print(round_line(result, self.rounds), highlight=False, markup=False)

    def _describe(self, loss: float | None) -> str:
        client = self.client_id if len(self.client_id) <= 28 else self.client_id[:25] + "..."
        text = f"round {self.round_num}/{self.rounds} · {client}"
        return text + (f" · loss {loss:.3f}" if loss is not None else "")


class SiteDisplay:
    """What `fedtune client` is doing now: a rich status line on a terminal, a plain line per change
    otherwise (a log file gets each state once, not every poll)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status = console.status("starting") if console.is_terminal else None
        self._last: str | None = None

    def __enter__(self) -> SiteDisplay:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._status is not None:
            self._status.stop()

    def show(self, state: str) -> None:
        if state == self._last:
            return
        self._last = state
        if self._status is not None:
            self._status.update(state)
        else:
            self.console.print(state, highlight=False, markup=False)

    def line(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)
