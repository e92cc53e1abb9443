"""A deployment's round state, shared by the gRPC handler threads and the engine's thread: plain types only.

Handlers call `join`, `session`, `next_task`, `check_submission`, `submit`, `secagg` and `poll` with
plain values (the service has parsed the bytes) and get plain values or a typed `Refusal` back; the gRPC
transport calls `open_round`, `open_exchange`, `exchange_done`, `close_exchange` and `close_round` on
behalf of the round engine. One lock (`condition`) guards everything; nothing here blocks, sleeps or does
I/O, and time comes from the injected `clock`, so the rules are unit-tested with a fake one.

The rules. A client's identity comes from its certificate (the caller passes it in); a session token ties
later calls to that join, and a second process with the same id is refused while the first is live. Each
member of an open round gets a fresh random nonce with its first message; a submission must carry the
open round's number and that nonce and uses it up, so a stale, replayed or duplicated update is refused.
An exchange is done when its target of taken replies is met, when every member it waits for has answered,
or at its deadline. Members whose training update never arrived are stragglers when the round closes.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from fedtune.errors import Refusal
from fedtune.round.messages import SecureTrainRequest, Submission
from fedtune.round.plan import Member
from fedtune.round.transport import Exchange, Exchanged, Purpose
from fedtune.secagg import Stage
from fedtune.transport.records import (
    NONCE_BYTES,
    REFUSED,
    SELECTED,
    SENT,
    SESSION_BYTES,
    STRAGGLER,
    SUBMITTED,
    Assignment,
    ClosedRound,
    Done,
    Offer,
    OpenExchange,
    OpenRound,
    RoundOver,
    Session,
    Wait,
)


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
        `on_status` report refused messages and participant changes of training rounds (the server writes
        them to SQLite; they are called under the lock)."""
        self.allowed = sorted(allowed)
        self.index = {c: i for i, c in enumerate(self.allowed)}
        self.config_toml = config_toml
        self.session_timeout_s = session_timeout_s
        self.retry_after_ms = max(1, int(poll_interval_s * 1000))
        self.clock = clock
        self.on_event = on_event
        self.on_status = on_status
        self.condition = threading.Condition()
        self._sessions: dict[bytes, Session] = {}
        self._by_client: dict[str, Session] = {}
        self._round: OpenRound | None = None
        self._closed: ClosedRound | None = None  # the last closed round, and why it ended
        self._silent: dict[str, float] = {}  # client -> when a training round closed without its answer
        self._done_reason: str | None = None
        self._refusals: Counter[str] = Counter()

    # ---- handler side ------------------------------------------------------------------------------

    def refuse(self, refusal: Refusal, client_id: str | None) -> None:
        """Count and report a refused message (the handler then answers with its status)."""
        with self.condition:
            self._refusals[refusal.kind] += 1
        self.on_event(refusal.kind, refusal.detail, client_id)

    def join(self, client_id: str, num_examples: int) -> bytes:
        """A new session for an allow-listed client; refused while another session of the same id is live."""
        if client_id not in self.index:
            raise Refusal(
                "not_allowed", f"client {client_id!r} is not on this run's allow-list (deploy.clients)"
            )
        with self.condition:
            now = self.clock()
            old = self._by_client.get(client_id)
            if old is not None and now - old.last_seen < self.session_timeout_s and not self._busy(client_id):
                raise Refusal(
                    "duplicate_client",
                    f"client {client_id!r} already has a live session; one process per client id "
                    f"(it expires {self.session_timeout_s:g} s after its last call)",
                )
            if old is not None:
                self._sessions.pop(old.token, None)
            session = Session(client_id, secrets.token_bytes(SESSION_BYTES), now, num_examples)
            self._sessions[session.token] = session
            self._by_client[client_id] = session
            self.condition.notify_all()
            return session.token

    def _busy(self, client_id: str) -> bool:
        """The client holds a task it has not answered: a restarted process may take it over."""
        r = self._round
        a = r.assignments.get(client_id) if r is not None else None
        return a is not None and a.status == SENT

    def session(self, token: bytes) -> Session:
        """The caller's session (refreshing its liveness); an unknown token means: join again."""
        with self.condition:
            session = self._sessions.get(token)
            if session is None:
                raise Refusal(
                    "unknown_session", "unknown session (the server may have restarted): join again"
                )
            session.last_seen = self.clock()
            return session

    def next_task(self, session: Session) -> Offer | Done | None:
        """The client's task in the open round (marked sent), Done when the run is over, or None: wait."""
        with self.condition:
            if self._done_reason is not None:
                session.told_done = True
                return Done(self._done_reason)
            r = self._round
            a = r.assignments.get(session.client_id) if r is not None else None
            if r is None or a is None or a.status not in (SELECTED, SENT) or a.slot not in r.tasks:
                return None
            first = r.first
            if r.secure and (first is None or first.closed):
                return None  # its key stage is over: too late to join this secure round
            a.status = SENT
            if first is not None:
                first.received.add(a.slot)
            offer = Offer(r.tasks[a.slot], a.nonce, r.deadline)
            self._status(r, a)
            return offer

    def _assignment(self, session: Session, round_num: int, nonce: bytes) -> tuple[OpenRound, Assignment]:
        """The open round's assignment a call answers; refused when stale, replayed or not this client's.
        Raises `RoundOver` for the round that just closed (a late call of a finished round)."""
        cid = session.client_id
        r = self._round
        if r is not None and r.round_num == round_num:
            a = r.assignments.get(cid)
            if a is not None and secrets.compare_digest(a.nonce, nonce):
                return r, a
        c = self._closed
        if c is not None and c.round.round_num == round_num:
            old = c.round.assignments.get(cid)
            if old is not None and secrets.compare_digest(old.nonce, nonce):
                raise RoundOver(c.reason)
        if r is None or r.round_num != round_num:
            current = "none" if r is None else r.round_num
            raise Refusal("stale", f"round {round_num} is not open (open round: {current})")
        if cid not in r.assignments:
            raise Refusal("not_selected", f"client {cid!r} is not selected in round {round_num}")
        raise Refusal("replayed", f"wrong nonce for round {round_num}: each task's nonce is accepted once")

    def _open_assignment(
        self, session: Session, round_num: int, nonce: bytes
    ) -> tuple[OpenRound, Assignment]:
        try:
            return self._assignment(session, round_num, nonce)
        except RoundOver as over:
            raise Refusal("stale", f"round {round_num} is over ({over.reason})") from None

    def check_submission(self, session: Session, round_num: int, nonce: bytes) -> Assignment:
        """The assignment a submission answers; refused when stale, replayed or not this client's."""
        with self.condition:
            _, a = self._open_assignment(session, round_num, nonce)
            if a.status not in (SELECTED, SENT):
                raise Refusal(
                    "replayed",
                    f"wrong or used nonce for round {round_num}: each task's nonce is accepted once",
                )
            return a

    def purpose(self) -> tuple[Purpose, int] | None:
        """The open round's purpose and, for a secure round, its masked payload's words (else 0)."""
        with self.condition:
            r = self._round
            if r is None:
                return None
            words = 0
            if r.secure:
                first = next(iter(r.tasks.values()))
                assert isinstance(first, SecureTrainRequest)
                words = first.params.payload_words
            return r.purpose, words

    def submit(self, session: Session, round_num: int, nonce: bytes, reply: object) -> bool:
        """An update or evaluation report into the open exchange; False if the round has enough already.
        Checked again under the lock, so two copies of one submission cannot both land."""
        with self.condition:
            r, a = self._open_assignment(session, round_num, nonce)
            if a.status not in (SELECTED, SENT):
                raise Refusal(
                    "replayed",
                    f"wrong or used nonce for round {round_num}: each task's nonce is accepted once",
                )
            ex = r.exchange
            if ex is None or ex.closed or not (ex.exchange.phase.trains or r.purpose == Purpose.EVALUATE):
                a.status = STRAGGLER
                self._status(r, a)
                return False
            taken = self._deliver(r, ex, a, reply, final=True)
            return taken

    def _deliver(self, r: OpenRound, ex: OpenExchange, a: Assignment, reply: object, *, final: bool) -> bool:
        """`reply` into the exchange's sink; a refusal marks the member refused, and is raised on."""
        try:
            taken = ex.exchange.deliver(a.slot, reply)
        except Refusal as refusal:
            ex.refused[a.slot] = refusal.detail
            if final:
                a.status = REFUSED
                self._status(r, a)
            self.condition.notify_all()
            raise
        (ex.answered if taken else ex.late).add(a.slot)
        if final:
            declined = isinstance(reply, Submission) and reply.update is None
            a.status = (REFUSED if declined else SUBMITTED) if taken else STRAGGLER
            self._status(r, a)
        self.condition.notify_all()
        return taken

    def secagg(self, session: Session, round_num: int, nonce: bytes, message: object) -> None:
        """A client's SecAgg+ stage message (keys, shares, unmasking shares) into the open stage."""
        with self.condition:
            r, a = self._open_assignment(session, round_num, nonce)
            ex = r.exchange
            if not r.secure or ex is None or ex.closed or ex.exchange.phase.trains or ex.stage is None:
                raise Refusal(
                    "protocol", f"no secure aggregation stage of round {round_num} takes this message now"
                )
            self._deliver(r, ex, a, message, final=False)

    def slot_of(self, session: Session, round_num: int, nonce: bytes) -> int:
        """The caller's slot in the open round (its SecAgg+ id), checked like any call of the round."""
        with self.condition:
            return self._open_assignment(session, round_num, nonce)[1].slot

    def poll(self, session: Session, round_num: int, nonce: bytes, stage: Stage) -> object:
        """What a client waiting for the message that opens secure `stage` is told now: the message,
        `Wait` (the stage is not open yet) or `Done` (it was left out, or the round is over)."""
        with self.condition:
            try:
                r, a = self._assignment(session, round_num, nonce)
            except RoundOver as over:
                return Done(over.reason)
            if not r.secure:
                raise Refusal("stale", f"no secure round {round_num} is open")
            ex = r.exchange
            if ex is None or ex.stage is None or ex.stage < stage:
                return Wait(50, f"stage {stage.label} is not open yet")
            if ex.stage > stage or ex.closed or a.slot not in ex.exchange.messages:
                return Done("left out of this round's secure sum (it dropped)")
            ex.received.add(a.slot)
            return ex.exchange.messages[a.slot]

    # ---- the engine's side, through the gRPC transport ---------------------------------------------

    def live_clients(self) -> set[str]:
        with self.condition:
            now = self.clock()
            return {
                c
                for c, s in self._by_client.items()
                if now - s.last_seen < self.session_timeout_s or self._busy(c)
            }

    def open_round(
        self, round_num: int, purpose: Purpose, members: Sequence[Member], deadline: float
    ) -> None:
        assignments = {m.client_id: Assignment(m, secrets.token_bytes(NONCE_BYTES)) for m in members}
        with self.condition:
            self._round = OpenRound(
                round_num, purpose, assignments, {a.slot: a for a in assignments.values()}, deadline
            )
            if purpose == Purpose.TRAIN:
                for a in assignments.values():
                    self._status(self._round, a)
            self.condition.notify_all()

    def open_exchange(self, exchange: Exchange, deadline: float) -> None:
        with self.condition:
            r = self._round
            if r is None:
                raise RuntimeError("open_exchange without an open round")
            expected = set(exchange.messages)
            first = r.exchange is None
            if first:  # the round's first messages are what clients fetch as their task
                r.tasks = dict(exchange.messages)
                r.secure = any(isinstance(m, SecureTrainRequest) for m in r.tasks.values())
            if r.purpose == Purpose.EVALUATE:  # wait only for clients that are here
                expected = {slot for slot in expected if self._present(r.by_slot[slot].member.client_id)}
            r.exchange = OpenExchange(exchange, deadline, expected, opened_at=self.clock())
            if first:
                r.first = r.exchange
            self.condition.notify_all()

    def exchange_done(self) -> bool:
        """The open exchange may close: its target is met, everyone it waits for answered, or its deadline."""
        with self.condition:
            r = self._round
            ex = None if r is None else r.exchange
            if ex is None:
                return True
            target = ex.exchange.target
            if target is not None and len(ex.answered) >= target:
                return True
            if ex.expected <= ex.answered | ex.late | set(ex.refused):
                return True
            return self.clock() >= ex.deadline

    def close_exchange(self) -> Exchanged:
        with self.condition:
            r = self._round
            assert r is not None and r.exchange is not None
            ex = r.exchange
            ex.closed = True
            self.condition.notify_all()
            return Exchanged(
                frozenset(ex.received),
                frozenset(ex.answered),
                frozenset(ex.late),
                dict(ex.refused),
                self.clock() - ex.opened_at,
            )

    def close_round(self, outcome: str | None = None) -> Mapping[str, int]:
        """End the open round: members still out become stragglers; the round's refused messages."""
        with self.condition:
            r = self._round
            if r is None:
                return {}
            self._round = None
            reason = f"the round aborted: {outcome}" if outcome else f"round {r.round_num} is over"
            self._closed = ClosedRound(r, reason)
            if r.purpose == Purpose.TRAIN:
                now = self.clock()
                for a in r.assignments.values():
                    if a.status in (SELECTED, SENT):
                        a.status = STRAGGLER
                        self._silent[a.member.client_id] = now
                        self._status(r, a)
            refused = dict(self._refusals)
            self._refusals.clear()  # the next round counts from here, its wait for clients included
            self.condition.notify_all()
            return refused

    def _present(self, client_id: str) -> bool:
        """Live, and not silent since a training round it never answered (crashed, most likely)."""
        session = self._by_client.get(client_id)
        if session is None or self.clock() - session.last_seen >= self.session_timeout_s:
            return False
        silent_since = self._silent.get(client_id)
        return silent_since is None or session.last_seen > silent_since

    def _status(self, r: OpenRound, a: Assignment) -> None:
        if r.purpose == Purpose.TRAIN:
            self.on_status(r.round_num, a.member.client_id, a.status)

    def undone_sessions(self) -> int:
        """Live sessions that have not yet been told the run is done."""
        with self.condition:
            now = self.clock()
            return sum(
                1
                for s in self._by_client.values()
                if not s.told_done and now - s.last_seen < self.session_timeout_s
            )

    def finish(self, reason: str) -> None:
        """Every later task request is answered Done(reason)."""
        with self.condition:
            self._done_reason = reason
            self.condition.notify_all()
