"""The server's round state, shared by the gRPC handler threads and the round loop: one lock, no I/O.

Handlers call `join`, `next_task`, `check_submission` and `accept`/`refuse`; the round loop calls
`open_round`, `wait_round` and `close_round`. A client's identity comes from its certificate (the caller
passes it in); a session token ties later calls to that join. Each selected client gets a fresh random
nonce with its task; a submission must carry the open round's number and that nonce, and uses it up, so a
stale, replayed or duplicated update is refused. A round closes when `target` updates were accepted, when
no selected client is still out, or at its deadline; whoever has not answered by then is a straggler.
Accepted updates go straight into the round's `sink` (the collector, streaming for FedAvg), so the
server holds O(adapter) per round whatever the number of clients.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc
import torch

from fedtune.transport import fedtune_v1_pb2 as pb
from fedtune.transport.wire import NONCE_BYTES, SESSION_BYTES, WireError

if TYPE_CHECKING:
    from fedtune.deploy.secure import SecureRound

SELECTED, SENT, SUBMITTED, REFUSED, STRAGGLER = "selected", "sent", "submitted", "refused", "straggler"

Sink = Callable[[int, "bytes | torch.Tensor", int], None]  # (slot, update, weight) into the collector


@dataclass
class Session:
    client_id: str
    token: bytes
    last_seen: float
    num_examples: int
    told_done: bool = False


@dataclass
class Assignment:
    client_id: str
    slot: int  # position in the round's cohort
    index: int  # position in the allow-list: names the client's seeds
    nonce: bytes
    status: str = SELECTED


@dataclass(frozen=True)
class ClientReport:
    """What an accepted or refused client said about its local work (diagnostics, not aggregated)."""

    client_id: str
    num_examples: int
    num_steps: int
    train_loss: float
    eval_loss: float | None
    eval_examples: int
    fits_clip: bool
    error: str | None = None


@dataclass
class RoundTask:
    """What every selected client of a round receives: the same global adapter and settings."""

    round_num: int
    adapter_bytes: bytes  # little-endian float32
    adapter_numel: int
    clip_l2_norm: float
    shared_seed: bytes
    deadline: float  # on the coordinator's clock
    secure: SecureRound | None = None  # set when the round runs through secure aggregation


@dataclass
class OpenRound:
    task: RoundTask
    target: int
    sink: Sink
    assignments: dict[str, Assignment]
    accepted: list[ClientReport] = field(default_factory=list)
    refused: list[ClientReport] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False


@dataclass(frozen=True)
class RoundOutcome:
    round_num: int
    selected: list[str]
    accepted: list[ClientReport]
    refused: list[ClientReport]  # updates the clients themselves refused (non-finite loss) or the server did
    stragglers: list[str]
    bytes_up: int
    bytes_down: int
    messages_refused: dict[str, int]  # refused messages by kind, during the round


class Coordinator:
    def __init__(
        self,
        allowed: Sequence[str],
        config_toml: str,
        *,
        session_timeout_s: float,
        poll_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str, str | None], None] = lambda kind, detail, client: None,
        on_status: Callable[[int, str, str], None] = lambda round_num, client, status: None,
    ) -> None:
        """`allowed` is the allow-list (sorted: a client's index is its place in it); `on_event` and
        `on_status` report refused messages and participant changes (the server writes them to SQLite)."""
        self.allowed = sorted(allowed)
        self.index = {c: i for i, c in enumerate(self.allowed)}
        self.config_toml = config_toml
        self.session_timeout_s = session_timeout_s
        self.retry_after_ms = max(1, int(poll_interval_s * 1000))
        self.clock = clock
        self.on_event = on_event
        self.on_status = on_status
        self._lock = threading.Condition()
        self._sessions: dict[bytes, Session] = {}
        self._by_client: dict[str, Session] = {}
        self._round: OpenRound | None = None
        self._done_reason: str | None = None
        self._refusals: Counter[str] = Counter()

    # ---- handler side ---------------------------------------------------------------------------------

    def refuse(self, error: WireError, client_id: str | None) -> None:
        """Count and report a refused message (the handler then answers with `error.code`)."""
        with self._lock:
            self._refusals[error.kind] += 1
        self.on_event(error.kind, error.detail, client_id)

    def join(self, client_id: str, num_examples: int) -> bytes:
        """A new session for an allow-listed client; refused while another session of the same id is live."""
        if client_id not in self.index:
            raise WireError(
                "not_allowed",
                f"client {client_id!r} is not on this run's allow-list (deploy.clients)",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        now = self.clock()
        with self._lock:
            old = self._by_client.get(client_id)
            if old is not None and now - old.last_seen < self.session_timeout_s and not self._busy(client_id):
                raise WireError(
                    "duplicate_client",
                    f"client {client_id!r} already has a live session; one process per client id "
                    f"(it expires {self.session_timeout_s:g} s after its last call)",
                    grpc.StatusCode.ALREADY_EXISTS,
                )
            if old is not None:
                self._sessions.pop(old.token, None)
            session = Session(client_id, secrets.token_bytes(SESSION_BYTES), now, num_examples)
            self._sessions[session.token] = session
            self._by_client[client_id] = session
            return session.token

    def _busy(self, client_id: str) -> bool:
        """True when the client holds a task it has not answered: a restarted process may take it over."""
        r = self._round
        a = r.assignments.get(client_id) if r is not None and not r.closed else None
        return a is not None and a.status == SENT

    def session(self, token: bytes) -> Session:
        """The caller's session (refreshing its liveness); an unknown token means: join again."""
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                raise WireError(
                    "unknown_session",
                    "unknown session (the server may have restarted): join again",
                    grpc.StatusCode.UNAUTHENTICATED,
                )
            session.last_seen = self.clock()
            return session

    def next_task(self, session: Session) -> tuple[RoundTask, Assignment] | str | None:
        """The client's task in the open round (and marks it sent), the reason the run is done (str), or
        None: wait and ask again."""
        with self._lock:
            if self._done_reason is not None:
                session.told_done = True
                return self._done_reason
            r = self._round
            if r is None or r.closed:
                return None
            a = r.assignments.get(session.client_id)
            if a is None or a.status not in (SELECTED, SENT):
                return None
            a.status = SENT
            r.bytes_down += len(r.task.adapter_bytes)
            task = r.task
        self.on_status(task.round_num, a.client_id, SENT)
        return task, a

    def check_submission(self, session: Session, round_num: int, nonce: bytes) -> Assignment:
        """The assignment a submission answers; refused when stale, replayed or not this client's."""
        with self._lock:
            r = self._round
            if r is None or r.closed or r.task.round_num != round_num:
                current = "none" if r is None or r.closed else r.task.round_num
                raise WireError(
                    "stale",
                    f"round {round_num} is not open (open round: {current})",
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
            a = r.assignments.get(session.client_id)
            if a is None:
                raise WireError(
                    "not_selected",
                    f"client {session.client_id!r} is not selected in round {round_num}",
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
            if a.status not in (SELECTED, SENT) or not secrets.compare_digest(a.nonce, nonce):
                raise WireError(
                    "replayed",
                    f"wrong or used nonce for round {round_num}: each task's nonce is accepted once",
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
            return a

    def accept(
        self,
        session: Session,
        round_num: int,
        nonce: bytes,
        update: bytes | torch.Tensor | None,
        report: ClientReport,
        wire_bytes: int,
        weight: int,
    ) -> bool:
        """Hand one update to the round's sink (None: the client refused its own update). Checked again
        under the lock, so two copies of one submission cannot both land. False if the round is full."""
        invalid: WireError | None = None
        with self._lock:
            a = self.check_submission(session, round_num, nonce)
            r = self._round
            assert r is not None  # check_submission refused a closed round
            r.bytes_up += wire_bytes
            secure = r.task.secure
            if len(r.accepted) >= r.target:
                a.status = STRAGGLER
                status, ok = STRAGGLER, False
                if secure is not None:
                    secure.declined(a.slot)
            elif update is None:
                a.status = REFUSED
                r.refused.append(report)
                status, ok = REFUSED, True
                if secure is not None:
                    secure.declined(a.slot)
            else:
                try:
                    r.sink(a.slot, update, weight)
                except Exception as exc:  # a payload that does not decode, a non-finite value...
                    a.status = REFUSED
                    r.refused.append(replace(report, error=str(exc)))
                    invalid = WireError("invalid_update", str(exc))
                    status, ok = REFUSED, False
                else:
                    a.status = SUBMITTED
                    r.accepted.append(report)
                    status, ok = SUBMITTED, True
            self._lock.notify_all()
        self.on_status(round_num, session.client_id, status)  # a refused update too: no longer "sent"
        if invalid is not None:
            raise invalid
        return ok

    def secagg(self, session: Session, request: pb.SecAggRequest) -> pb.SecAggReply:
        """A secure aggregation stage message or poll from a selected client of the open secure round."""
        with self._lock:
            a = self._secure_assignment(session, int(request.round), request.nonce)
            secure = self._round.task.secure  # type: ignore[union-attr]
            assert secure is not None
            if request.WhichOneof("stage") == "poll":
                return secure.poll(a.slot, int(request.poll.stage))
            secure.receive(a.slot, request)
            self._lock.notify_all()
            return pb.SecAggReply(ack=pb.Ack())

    def _secure_assignment(self, session: Session, round_num: int, nonce: bytes) -> Assignment:
        r = self._round
        if r is None or r.closed or r.task.round_num != round_num or r.task.secure is None:
            raise WireError(
                "stale", f"no secure round {round_num} is open", grpc.StatusCode.FAILED_PRECONDITION
            )
        a = r.assignments.get(session.client_id)
        if a is None or not secrets.compare_digest(a.nonce, nonce):
            raise WireError(
                "replayed",
                f"wrong nonce, or not selected, for secure round {round_num}",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        return a

    def wait_secure_stage(self, deadline: float, stop: threading.Event) -> None:
        """Block until every client expected at the open secure stage answered, or `deadline`."""
        with self._lock:
            r = self._round
            assert r is not None and r.task.secure is not None
            while not stop.is_set() and not r.task.secure.complete() and self.clock() < deadline:
                self._lock.wait(min(0.1, max(0.0, deadline - self.clock())))

    def close_secure_stage(self) -> None:
        with self._lock:
            r = self._round
            assert r is not None and r.task.secure is not None
            r.task.secure.close_stage()
            self._lock.notify_all()

    # ---- round loop side ------------------------------------------------------------------------------

    def live_clients(self) -> set[str]:
        now = self.clock()
        with self._lock:
            return {
                c
                for c, s in self._by_client.items()
                if now - s.last_seen < self.session_timeout_s or self._busy(c)
            }

    def wait_connected(self, count: int, timeout_s: float, stop: threading.Event) -> int:
        """Wait until `count` allow-listed clients are live (or the timeout); returns how many are."""
        end = self.clock() + timeout_s
        while True:
            live = len(self.live_clients())
            if live >= count or self.clock() >= end or stop.is_set():
                return live
            with self._lock:
                self._lock.wait(0.05)

    def open_round(self, task: RoundTask, cohort: Sequence[str], target: int, sink: Sink) -> None:
        assignments = {
            c: Assignment(c, slot, self.index[c], secrets.token_bytes(NONCE_BYTES))
            for slot, c in enumerate(cohort)
        }
        with self._lock:
            self._round = OpenRound(task, target, sink, assignments)
            self._lock.notify_all()

    def wait_round(self, stop: threading.Event) -> None:
        """Block until the open round may close: enough updates, nobody still out, or the deadline."""
        with self._lock:
            r = self._round
            assert r is not None
            while not stop.is_set():
                if r.task.secure is not None:  # the clients admitted to stage 2 are the ones to wait for
                    outstanding = not r.task.secure.complete()
                else:
                    outstanding = any(a.status in (SELECTED, SENT) for a in r.assignments.values())
                if len(r.accepted) >= r.target or not outstanding or self.clock() >= r.task.deadline:
                    return
                self._lock.wait(min(0.1, max(0.0, r.task.deadline - self.clock())))

    def close_round(self) -> RoundOutcome:
        with self._lock:
            r = self._round
            assert r is not None
            r.closed = True
            stragglers = [
                a.client_id for a in r.assignments.values() if a.status in (SELECTED, SENT, STRAGGLER)
            ]
            for a in r.assignments.values():
                if a.status in (SELECTED, SENT):
                    a.status = STRAGGLER
            outcome = RoundOutcome(
                r.task.round_num,
                list(r.assignments),
                list(r.accepted),
                list(r.refused),
                stragglers,
                r.bytes_up,
                r.bytes_down,
                dict(self._refusals),
            )
            self._refusals.clear()  # the next round counts from here, its wait for clients included
        for c in stragglers:
            self.on_status(outcome.round_num, c, STRAGGLER)
        return outcome

    def undone_sessions(self) -> int:
        """Live sessions that have not yet been told the run is done."""
        now = self.clock()
        with self._lock:
            return sum(
                1
                for s in self._by_client.values()
                if not s.told_done and now - s.last_seen < self.session_timeout_s
            )

    def finish(self, reason: str) -> None:
        """Every later task request is answered with Done(reason)."""
        with self._lock:
            self._done_reason = reason
            self._lock.notify_all()
