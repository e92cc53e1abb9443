"""Reading a run directory while the run writes it, without slowing or blocking it.

- `MetricsTail` reads `metrics.jsonl` incrementally: it remembers the offset after the last complete
  line, so each poll reads only what was appended; a half-written last line waits until its newline
  arrives. A file that shrank or whose first bytes changed (a new run in the same folder, a resumed
  deployment rewriting its rows) is read again from the start.
- `state.db` is opened read-only for each poll (`Store(read_only=True)`, SQLite's `mode=ro`): under WAL
  a reader never blocks the server's writes, and the dashboard cannot change the state file.
- The settings come from the run's `config.toml` through `tomllib`, not `fedtune.config`: the config
  schema imports torch (seconds, and a few hundred MiB), which a page that only reads files does not need.
  The run wrote that file from its validated config; a key it lacks reads as its default.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.dashboard.summary import (
    DeploymentState,
    OpenRound,
    ParticipantNow,
    RefusalLine,
    RunSettings,
    RunSummary,
    summarize,
)
from fedtune.errors import StateError
from fedtune.status import participation, refused_counts
from fedtune.store import REFUSED_EVENT_PREFIX, STATE_FILE, Store

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
REPORT_FILE = "report.md"
_HEAD_BYTES = 256  # the file's first bytes, compared on every poll to notice a rewrite
_LATEST_REFUSALS = 20


class MetricsTail:
    """The complete lines of a growing JSON-lines file, parsed, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._head = b""
        self._rows: list[Any] = []
        self.bad_lines = 0  # complete lines that are not JSON

    def _reset(self) -> None:
        self._offset, self._head, self._rows, self.bad_lines = 0, b"", [], 0

    def read(self) -> list[Any]:
        """Every complete line so far, each parsed (a JSON value; the caller checks it is a row)."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            self._reset()
            return []
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self._offset or (self._head and f.read(len(self._head)) != self._head):
                self._reset()
            if size == self._offset:
                return list(self._rows)
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return list(self._rows)  # only a half-written line since the last poll
        for line in chunk[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                self._rows.append(json.loads(line))
            except ValueError:
                self.bad_lines += 1
        if self._offset == 0:
            self._head = chunk[: min(end + 1, _HEAD_BYTES)]
        self._offset += end + 1
        return list(self._rows)


def read_settings(path: Path) -> RunSettings:
    """The run's settings the page shows, from its config.toml (defaults for keys it lacks)."""
    with path.open("rb") as f:
        doc = tomllib.load(f)

    def section(name: str) -> dict[str, Any]:
        value = doc.get(name)
        return value if isinstance(value, dict) else {}

    run, fed, privacy = section("run"), section("federation"), section("privacy")
    rounds = fed.get("rounds", 3)
    target = privacy.get("target_epsilon")
    delta = privacy.get("delta")
    return RunSettings(
        name=str(run.get("name", path.parent.name)),
        rounds=rounds if isinstance(rounds, int) else None,
        topology=str(fed.get("topology", "star")),
        privacy_mode=str(privacy.get("mode", "off")),
        target_epsilon=float(target) if isinstance(target, int | float) else None,
        delta=float(delta) if isinstance(delta, int | float) else None,
        attack=str(section("attack").get("kind", "none")),
        personalize=str(section("personalize").get("method", "none")),
        secure_aggregation=bool(section("secure_aggregation").get("enabled", False)),
    )


def read_deployment(path: Path) -> DeploymentState:
    """What a deployment's state file adds to its rows: the round in flight and the refusals' reasons."""
    with Store(path, read_only=True) as store:
        latest = store.latest_round()
        counts = store.event_counts()
        refusals = store.latest_events(REFUSED_EVENT_PREFIX, last=_LATEST_REFUSALS)
    open_round = None
    if latest is not None and latest.status == "open":
        part = participation(latest.participants)
        open_round = OpenRound(
            round_num=latest.round_num,
            started_at=latest.started_at,
            submitted=part.submitted,
            waiting=part.stragglers,
            participants=tuple(ParticipantNow(p.client_id, p.status, p.detail) for p in latest.participants),
        )
    return DeploymentState(
        open_round=open_round,
        refused_totals=refused_counts(counts),
        latest_refusals=tuple(
            RefusalLine(e.at, e.round_num, e.client_id, e.kind, e.detail) for e in refusals
        ),
    )


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


class RunWatcher:
    """One run directory, read on demand; safe to call from the server's threads (one read at a time)."""

    def __init__(self, run_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.run_dir = Path(run_dir)
        self._clock = clock
        self._tail = MetricsTail(self.run_dir / METRICS_FILE)
        self._lock = threading.Lock()
        self._settings: tuple[float, RunSettings] | None = None

    def summary(self) -> RunSummary:
        with self._lock:
            return self._summary()

    def _summary(self) -> RunSummary:
        notes: list[str] = []
        rows = self._tail.read()
        if self._tail.bad_lines:
            notes.append(f"{self._tail.bad_lines} line(s) of {METRICS_FILE} are not JSON and were skipped")
        settings = self._read_settings(notes)
        deployment = None
        state_file = self.run_dir / STATE_FILE
        if state_file.is_file():
            try:
                deployment = read_deployment(state_file)
            except (StateError, OSError, sqlite3.Error) as err:
                notes.append(f"{STATE_FILE} could not be read: {err}")
        now = self._clock()
        metrics_at, report_at = _mtime(self._tail.path), _mtime(self.run_dir / REPORT_FILE)
        return summarize(
            run_dir=str(self.run_dir),
            rows=rows,
            settings=settings,
            deployment=deployment,
            finished=bool(rows)
            and metrics_at is not None
            and report_at is not None
            and report_at >= metrics_at,
            last_update_age_s=None if metrics_at is None or not rows else max(now - metrics_at, 0.0),
            now=now,
            notes=notes,
        )

    def _read_settings(self, notes: list[str]) -> RunSettings | None:
        path = self.run_dir / CONFIG_FILE
        mtime = _mtime(path)
        if mtime is None:
            return None
        if self._settings is not None and self._settings[0] == mtime:
            return self._settings[1]
        try:
            settings = read_settings(path)
        except (OSError, tomllib.TOMLDecodeError, ValueError) as err:
            notes.append(f"{CONFIG_FILE} could not be read: {err}")
            return None
        self._settings = (mtime, settings)
        return settings
