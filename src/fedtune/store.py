"""The server's state in one SQLite file, so `fedtune server --resume` continues after a kill.

What is notable:
- A round ends in one transaction: its status, its metrics and its checkpoint (global adapter, server
  optimizer state, DP state) commit together or not at all. After a crash mid-round the open round is simply
  re-run: `completed_rounds()` and `latest_checkpoint()` still describe the last round that finished.
- Tensors are stored as safetensors bytes, never pickle (`fedtune.checkpoint`): a blob that does not hold
  what it should is a corrupt file and raises StateError.
- One connection is shared by the gRPC handler threads and the round loop, serialized by a lock; writes take
  `BEGIN IMMEDIATE`. WAL with `synchronous=FULL` makes a committed round durable and lets `fedtune status`
  read while the server writes.
- The schema version is `PRAGMA user_version`; a file of another version is refused, never migrated.
- `Store(path, read_only=True)` (`fedtune status`, the dashboard) opens the file with SQLite's `mode=ro`:
  it never writes the database (SQLite may add its `-wal`/`-shm` files beside a closed one), and under WAL
  its short read transactions never block the server's writes.
- Metrics are strict JSON: NaN and Inf are stored as null. DP state and `extra` round-trip exactly.

Participant statuses, by convention: "selected" -> "sent" -> "submitted", or a terminal one the server names
("refused", "dropped", ...). Selected or sent at the end of a round means a straggler. Event kinds that start
with "refused" count as refused messages (`fedtune.status`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import StateError
from fedtune.jsonstate import loads, metrics_json

if TYPE_CHECKING:  # checkpoints hold tensors: torch loads only where one is written or read
    from fedtune.checkpoint import Checkpoint, Encoded

SCHEMA_VERSION = 1
STATE_FILE = "state.db"  # in the run directory
WAITING_STATUSES = frozenset({"selected", "sent", "straggler"})
SUBMITTED_STATUS = "submitted"
REFUSED_EVENT_PREFIX = "refused"

_SCHEMA = (
    """CREATE TABLE run (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        config_toml TEXT NOT NULL,
        created_at REAL NOT NULL)""",
    """CREATE TABLE rounds (
        round INTEGER PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('open', 'done', 'failed')),
        started_at REAL NOT NULL,
        finished_at REAL,
        metrics_json TEXT)""",
    """CREATE TABLE participants (
        round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE,
        client_id TEXT NOT NULL,
        status TEXT NOT NULL,
        detail TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (round, client_id))""",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        round INTEGER,
        client_id TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL)""",
    "CREATE INDEX events_by_round ON events(round, kind)",
    """CREATE TABLE checkpoints (
        round INTEGER PRIMARY KEY,
        adapter BLOB NOT NULL,
        optimizer BLOB NOT NULL,
        dp_state TEXT,
        extra_json TEXT,
        created_at REAL NOT NULL)""",
)


@dataclass(frozen=True)
class Participant:
    client_id: str
    status: str
    detail: str | None


@dataclass(frozen=True)
class Event:
    at: float  # Unix time
    round_num: int | None
    client_id: str | None
    kind: str
    detail: str


@dataclass(frozen=True)
class RoundRecord:
    round_num: int
    status: str
    started_at: float
    finished_at: float | None
    metrics: dict[str, Any] | None
    participants: list[Participant]


class Store:
    """The state file of one run. Safe to call from several threads; every write is one transaction."""

    def __init__(self, path: Path, *, create: bool = True, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if (read_only or not create) and not self.path.is_file():
            raise StateError(
                f"no server state at {self.path}: start `fedtune server` first, or check run.dir"
            )
        self._lock = threading.Lock()
        self._closed = False
        if read_only:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5.0)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        try:
            if read_only:
                self._check_version()
            else:
                self._setup()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise StateError(
                f"{self.path} is not a fedtune state file ({err}): choose another run.dir"
            ) from err
        except StateError:
            self._conn.close()
            raise

    def _setup(self) -> None:
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        if self._user_version() == SCHEMA_VERSION:
            return
        with self._write() as conn:
            version = self._user_version()
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StateError(
                        f"{self.path} holds another database, not fedtune state: choose another run.dir"
                    )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has state schema version {version}, this fedtune reads version "
                    f"{SCHEMA_VERSION}: use the fedtune version that wrote it, or choose another run.dir"
                )

    def _check_version(self) -> None:
        """A read-only open: the schema must be this version's already (nothing is created or migrated)."""
        version = self._user_version()
        if version == 0:
            raise StateError(f"{self.path} is not a fedtune state file: pass a `fedtune server` run's")
        if version != SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has state schema version {version}, this fedtune reads version "
                f"{SCHEMA_VERSION}: use the fedtune version that wrote it"
            )

    def _user_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; rolled back if the body raises."""
        with self._lock:
            self._check_open()
            if self.read_only:
                raise StateError(f"{self.path} was opened read-only; open a Store without read_only to write")
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot even while another process writes."""
        with self._lock:
            self._check_open()
            with self._conn:
                self._conn.execute("BEGIN")
                yield self._conn

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"the state store {self.path} is closed; open a new Store to use it")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The run.

    def start_run(self, config_toml: str) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT created_at FROM run").fetchone()
            if row is not None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row[0]))
                raise StateError(
                    f"{self.path} already holds a run started {started}: pass --resume to continue it, "
                    "or choose another run.dir"
                )
            conn.execute(
                "INSERT INTO run (id, config_toml, created_at) VALUES (1, ?, ?)", (config_toml, time.time())
            )

    def replace_run_config(self, config_toml: str) -> None:
        """The stored run's config, after `--resume` changed what a resumed run may change."""
        with self._write() as conn:
            conn.execute("UPDATE run SET config_toml = ? WHERE id = 1", (config_toml,))

    def run_config(self) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT config_toml FROM run").fetchone()
        return None if row is None else str(row[0])

    # Rounds and participants.

    def open_round(self, round_num: int, selected: Sequence[str]) -> None:
        """Open `round_num` with `selected` as its participants; re-opening an open round (a re-run after a
        crash) replaces its participants."""
        duplicates = sorted(c for c, n in Counter(selected).items() if n > 1)
        if duplicates:
            raise StateError(
                f"client {duplicates[0]!r} selected twice for round {round_num}; select each once"
            )
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT status FROM rounds WHERE round = ?", (round_num,)).fetchone()
            if row is not None and row[0] != "open":
                raise StateError(
                    f"round {round_num} already finished ({row[0]}); a resumed run continues at "
                    "completed_rounds() + 1"
                )
            conn.execute(
                "INSERT INTO rounds (round, status, started_at) VALUES (?, 'open', ?) ON CONFLICT (round) "
                "DO UPDATE SET started_at = excluded.started_at, finished_at = NULL, metrics_json = NULL",
                (round_num, now),
            )
            conn.execute("DELETE FROM participants WHERE round = ?", (round_num,))
            conn.executemany(
                "INSERT INTO participants (round, client_id, status, updated_at) "
                "VALUES (?, ?, 'selected', ?)",
                [(round_num, client_id, now) for client_id in selected],
            )

    def set_participant(self, round_num: int, client_id: str, status: str, detail: str | None = None) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO participants (round, client_id, status, detail, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (round, client_id) DO UPDATE SET status = excluded.status, "
                    "detail = excluded.detail, updated_at = excluded.updated_at",
                    (round_num, client_id, status, detail, time.time()),
                )
        except sqlite3.IntegrityError as err:
            raise StateError(
                f"round {round_num} was never opened; call open_round before set_participant"
            ) from err

    def finish_round(self, round_num: int, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        """Mark the round done with its metrics and, when given, its checkpoint, in one transaction."""
        self._close(round_num, "done", metrics, checkpoint)

    def fail_round(
        self, round_num: int, reason: str, metrics: dict[str, Any], checkpoint: Checkpoint | None = None
    ) -> None:
        """Mark the round failed; `reason` is kept in its metrics as "round_failed". A failed round leaves
        the global adapter as it was; its checkpoint, when given, carries that state forward so that a
        resume goes past the round."""
        self._close(round_num, "failed", {**metrics, "round_failed": reason}, checkpoint)

    def _close(
        self, round_num: int, status: str, metrics: dict[str, Any], checkpoint: Checkpoint | None
    ) -> None:
        if checkpoint is not None and checkpoint.round_num != round_num:
            raise StateError(f"checkpoint of round {checkpoint.round_num} passed to close round {round_num}")
        encoded = None if checkpoint is None else _encode(checkpoint)
        row_json = metrics_json(metrics)
        with self._write() as conn:
            _close_round(conn, round_num, status, row_json)
            if encoded is not None:
                _insert_checkpoint(conn, round_num, encoded)

    def rounds(self) -> list[RoundRecord]:
        """Every round, ascending, each with its participants in selection order."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT round, status, started_at, finished_at, metrics_json FROM rounds ORDER BY round"
            ).fetchall()
            parts = conn.execute(
                "SELECT round, client_id, status, detail FROM participants ORDER BY round, rowid"
            ).fetchall()
        by_round: dict[int, list[Participant]] = {}
        for round_num, client_id, status, detail in parts:
            by_round.setdefault(round_num, []).append(Participant(client_id, status, detail))
        return [
            RoundRecord(
                r, status, started, finished, loads(metrics, f"metrics of round {r}"), by_round.get(r, [])
            )
            for r, status, started, finished, metrics in rows
        ]

    def latest_round(self) -> RoundRecord | None:
        """The highest round with its participants (the one in flight while the server runs); None: none."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT round, status, started_at, finished_at, metrics_json FROM rounds "
                "ORDER BY round DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            parts = conn.execute(
                "SELECT client_id, status, detail FROM participants WHERE round = ? ORDER BY rowid", (row[0],)
            ).fetchall()
        r, status, started, finished, metrics = row
        participants = [Participant(c, s, d) for c, s, d in parts]
        return RoundRecord(
            r, status, started, finished, loads(metrics, f"metrics of round {r}"), participants
        )

    def completed_rounds(self) -> int:
        """The highest round that is done or failed; 0 if none."""
        with self._read() as conn:
            row = conn.execute("SELECT max(round) FROM rounds WHERE status IN ('done', 'failed')").fetchone()
        return 0 if row[0] is None else int(row[0])

    # Events.

    def record_event(
        self, kind: str, detail: str, *, round_num: int | None = None, client_id: str | None = None
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO events (at, round, client_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), round_num, client_id, kind, detail),
            )

    def latest_events(self, kind_prefix: str, last: int) -> list[Event]:
        """The `last` events whose kind starts with `kind_prefix`, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT at, round, client_id, kind, detail FROM events WHERE kind LIKE ? || '%' "
                "ORDER BY id DESC LIMIT ?",
                (kind_prefix, last),
            ).fetchall()
        return [Event(float(a), r, c, str(k), str(d)) for a, r, c, k, d in reversed(rows)]

    def event_counts(self, round_num: int | None = None) -> dict[str, int]:
        """Event kind -> count, for one round or (None) the whole run."""
        with self._read() as conn:
            if round_num is None:
                rows = conn.execute(
                    "SELECT kind, count(*) FROM events GROUP BY kind ORDER BY kind"
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT kind, count(*) FROM events WHERE round = ? GROUP BY kind ORDER BY kind",
                    (round_num,),
                ).fetchall()
        return {kind: int(n) for kind, n in rows}

    # Checkpoints.

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint outside a round, e.g. the initial adapter as round 0."""
        encoded = _encode(checkpoint)
        with self._write() as conn:
            _insert_checkpoint(conn, checkpoint.round_num, encoded)

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT round, adapter, optimizer, dp_state, extra_json FROM checkpoints "
                "ORDER BY round DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        from fedtune.checkpoint import decode_checkpoint

        return decode_checkpoint(*row, where=str(self.path))

    def keep_checkpoints(self, last: int = 2) -> None:
        """Delete all but the `last` newest checkpoints; the latest is always kept."""
        if last < 1:
            raise StateError(
                f"keep_checkpoints(last={last}) would delete the checkpoint --resume needs; keep >= 1"
            )
        with self._write() as conn:
            conn.execute(
                "DELETE FROM checkpoints WHERE round NOT IN "
                "(SELECT round FROM checkpoints ORDER BY round DESC LIMIT ?)",
                (last,),
            )


def _close_round(conn: sqlite3.Connection, round_num: int, status: str, metrics_json: str) -> None:
    updated = conn.execute(
        "UPDATE rounds SET status = ?, finished_at = ?, metrics_json = ? WHERE round = ? AND status = 'open'",
        (status, time.time(), metrics_json, round_num),
    ).rowcount
    if updated == 1:
        return
    row = conn.execute("SELECT status FROM rounds WHERE round = ?", (round_num,)).fetchone()
    if row is None:
        raise StateError(f"round {round_num} was never opened; call open_round before finishing it")
    raise StateError(f"round {round_num} is already {row[0]}; a round finishes once")


def _encode(checkpoint: Checkpoint) -> Encoded:
    from fedtune.checkpoint import encode_checkpoint

    return encode_checkpoint(checkpoint)


def _insert_checkpoint(conn: sqlite3.Connection, round_num: int, encoded: Encoded) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO checkpoints (round, adapter, optimizer, dp_state, extra_json, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (round_num, *encoded, time.time()),
    )
