"""The deployment's round state on plain types, with a fake clock: no sockets, no waiting.

Sessions and duplicate ids, nonces used once, stale and replayed submissions, exchange deadlines and
targets, stragglers, the secure stages' polls, and the round that just closed: each rule checked in
microseconds by moving the clock by hand.
"""

from __future__ import annotations

import pytest
import torch

from fedtune.errors import Refusal
from fedtune.round.messages import (
    ClientReport,
    DenseUpdate,
    EvalReport,
    EvalRequest,
    Submission,
    TrainRequest,
    TrainTask,
)
from fedtune.round.plan import Member
from fedtune.round.transport import Exchange, Phase, Purpose
from fedtune.secagg import Stage
from fedtune.secagg.messages import NeighbourKeys
from fedtune.transport.coordinator import Coordinator, Done, Offer, Wait

CLIENTS = ("a", "b", "c")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def coordinator(clock: Clock) -> Coordinator:
    statuses: list[tuple[int, str, str]] = []
    c = Coordinator(
        CLIENTS,
        "",
        session_timeout_s=60,
        poll_interval_s=1,
        clock=clock,
        on_status=lambda *s: statuses.append(s),
    )
    c.statuses = statuses  # type: ignore[attr-defined]
    return c


def members(*ids: str) -> list[Member]:
    return [Member(slot, CLIENTS.index(cid), cid) for slot, cid in enumerate(ids)]


def submission(cid: str) -> Submission:
    return Submission(ClientReport(cid, 10, 2, 1.0), DenseUpdate(torch.zeros(4)))


def open_training(c: Coordinator, clock: Clock, ids=CLIENTS, target=None, deadline_s=30.0):
    """A training round over `ids`; the sink records what it takes."""
    taken: list[int] = []

    def deliver(slot: int, reply: object) -> bool:
        if target is not None and len(taken) >= target:
            return False
        taken.append(slot)
        return True

    ms = members(*ids)
    task = TrainTask(1, torch.zeros(4), None, None)
    c.open_round(1, Purpose.TRAIN, ms, clock() + deadline_s)
    c.open_exchange(
        Exchange(Phase.TRAIN, {m.slot: TrainRequest(task, m) for m in ms}, deliver, target),
        clock() + deadline_s,
    )
    return taken


def offer(c: Coordinator, token: bytes) -> Offer:
    found = c.next_task(c.session(token))
    assert isinstance(found, Offer), found
    return found


def test_a_second_process_with_one_id_is_refused_until_the_first_session_expires(coordinator, clock):
    coordinator.join("a", 10)
    with pytest.raises(Refusal) as refused:
        coordinator.join("a", 10)
    assert refused.value.kind == "duplicate_client"
    clock.now += 61
    assert coordinator.join("a", 10)  # the first one is away: a restarted process takes over
    with pytest.raises(Refusal, match="allow-list"):
        coordinator.join("z", 1)
    with pytest.raises(Refusal) as unknown:
        coordinator.session(b"\x00" * 16)
    assert unknown.value.kind == "unknown_session"


def test_a_process_holding_an_unanswered_task_may_be_replaced_at_once(coordinator, clock):
    token = coordinator.join("a", 10)
    open_training(coordinator, clock)
    offer(coordinator, token)
    assert coordinator.join("a", 10)  # it holds a task it has not answered: a restart, not a duplicate


def test_a_submission_uses_up_its_nonce_and_a_replay_or_stale_one_is_refused(coordinator, clock):
    token = coordinator.join("a", 10)
    taken = open_training(coordinator, clock)
    task = offer(coordinator, token)
    session = coordinator.session(token)
    with pytest.raises(Refusal) as wrong:
        coordinator.check_submission(session, 1, b"\x01" * 16)
    assert wrong.value.kind == "replayed"
    with pytest.raises(Refusal) as stale:
        coordinator.check_submission(session, 2, task.nonce)
    assert stale.value.kind == "stale"
    assert coordinator.submit(session, 1, task.nonce, submission("a"))
    assert taken == [0]
    with pytest.raises(Refusal) as replay:
        coordinator.submit(session, 1, task.nonce, submission("a"))
    assert replay.value.kind == "replayed"
    assert (1, "a", "submitted") in coordinator.statuses


def test_an_exchange_closes_at_its_target_with_the_rest_as_stragglers(coordinator, clock):
    tokens = {cid: coordinator.join(cid, 10) for cid in CLIENTS}
    taken = open_training(coordinator, clock, target=2)
    offers = {cid: offer(coordinator, t) for cid, t in tokens.items()}
    for cid in ("b", "a"):
        assert coordinator.submit(coordinator.session(tokens[cid]), 1, offers[cid].nonce, submission(cid))
    assert coordinator.exchange_done()  # the target is met: c need not be waited for
    assert not coordinator.submit(coordinator.session(tokens["c"]), 1, offers["c"].nonce, submission("c"))
    done = coordinator.close_exchange()
    assert done.answered == {0, 1} and done.late == {2} and done.received == {0, 1, 2}
    assert sorted(taken) == [0, 1]
    coordinator.close_round()
    assert (1, "c", "straggler") in coordinator.statuses


def test_an_exchange_closes_at_its_deadline_and_silent_members_become_stragglers(coordinator, clock):
    token = coordinator.join("a", 10)
    open_training(coordinator, clock, deadline_s=30)
    task = offer(coordinator, token)
    assert coordinator.submit(coordinator.session(token), 1, task.nonce, submission("a"))
    assert not coordinator.exchange_done()  # b and c are still out
    clock.now += 29.9
    assert not coordinator.exchange_done()
    clock.now += 0.2
    assert coordinator.exchange_done()
    done = coordinator.close_exchange()
    assert done.answered == {0} and done.received == {0}
    coordinator.close_round()
    assert {(1, "b", "straggler"), (1, "c", "straggler")} <= set(coordinator.statuses)


def test_a_refused_reply_marks_the_member_refused_and_counts_as_answered(coordinator, clock):
    token = coordinator.join("a", 10)

    def refuse(slot: int, reply: object) -> bool:
        raise Refusal("invalid_update", "does not decode")

    ms = members("a")
    task = TrainTask(1, torch.zeros(4), None, None)
    coordinator.open_round(1, Purpose.TRAIN, ms, clock() + 30)
    coordinator.open_exchange(Exchange(Phase.TRAIN, {0: TrainRequest(task, ms[0])}, refuse), clock() + 30)
    nonce = offer(coordinator, token).nonce
    with pytest.raises(Refusal, match="does not decode"):
        coordinator.submit(coordinator.session(token), 1, nonce, submission("a"))
    assert coordinator.exchange_done()
    assert coordinator.close_exchange().refused == {0: "does not decode"}
    assert (1, "a", "refused") in coordinator.statuses


def test_an_evaluation_waits_only_for_connected_clients_and_its_statuses_are_not_recorded(coordinator, clock):
    token = coordinator.join("a", 10)  # b and c never connected
    reports: dict[int, object] = {}
    ms = members(*CLIENTS)
    coordinator.open_round(3, Purpose.EVALUATE, ms, clock() + 600)
    messages = {m.slot: EvalRequest(3, torch.zeros(4), m) for m in ms}
    coordinator.open_exchange(
        Exchange(Phase.EVALUATE, messages, lambda s, r: reports.setdefault(s, r) is r), clock() + 600
    )
    found = offer(coordinator, token)
    assert isinstance(found.message, EvalRequest)
    assert coordinator.submit(coordinator.session(token), 3, found.nonce, EvalReport("a", 4.0, 2))
    assert coordinator.exchange_done()  # no need to wait 600 s for clients that are away
    assert coordinator.close_exchange().answered == {0}
    assert coordinator.statuses == []


def test_secure_stage_polls_wait_deliver_or_tell_the_client_it_is_out(coordinator, clock):
    tokens = {cid: coordinator.join(cid, 10) for cid in ("a", "b")}
    ms = members("a", "b")
    coordinator.open_round(1, Purpose.TRAIN, ms, clock() + 30)
    from fedtune.round.messages import SecureTrainRequest
    from fedtune.secagg import FixedPoint, SecAggParams

    params = SecAggParams(1, 4, 2, 1, FixedPoint(8, 1.0, 1, 2))
    task = TrainTask(1, torch.zeros(4), None, None)
    secure = {m.slot: SecureTrainRequest(task, m, params) for m in ms}
    coordinator.open_exchange(Exchange(Phase.ADVERTISE_KEYS, secure, lambda s, r: True), clock() + 30)
    nonces = {cid: offer(coordinator, t).nonce for cid, t in tokens.items()}
    session_a = coordinator.session(tokens["a"])
    assert isinstance(coordinator.poll(session_a, 1, nonces["a"], Stage.SHARE_KEYS), Wait)
    coordinator.close_exchange()
    assert isinstance(coordinator.poll(session_a, 1, nonces["a"], Stage.SHARE_KEYS), Wait)  # not open yet
    keys = NeighbourKeys(1, 0, ())
    coordinator.open_exchange(Exchange(Phase.SHARE_KEYS, {0: keys}, lambda s, r: True), clock() + 30)
    assert coordinator.poll(session_a, 1, nonces["a"], Stage.SHARE_KEYS) is keys
    session_b = coordinator.session(tokens["b"])
    left_out = coordinator.poll(session_b, 1, nonces["b"], Stage.SHARE_KEYS)
    assert isinstance(left_out, Done) and "left out" in left_out.reason  # b dropped at stage 0
    assert isinstance(coordinator.poll(session_a, 1, nonces["a"], Stage.MASKED_INPUT), Wait)
    coordinator.close_exchange()
    coordinator.close_round("only 1 clients shared keys; the threshold is 2")
    over = coordinator.poll(session_a, 1, nonces["a"], Stage.MASKED_INPUT)
    assert isinstance(over, Done) and "aborted" in over.reason and "threshold" in over.reason
    with pytest.raises(Refusal) as stale:  # a late stage message of the closed round
        coordinator.secagg(session_a, 1, nonces["a"], keys)
    assert stale.value.kind == "stale"


def test_refused_messages_are_counted_per_round(coordinator, clock):
    coordinator.refuse(Refusal("malformed", "x"), None)
    coordinator.refuse(Refusal("malformed", "y"), "a")
    open_training(coordinator, clock)
    coordinator.refuse(Refusal("stale", "z"), "b")
    assert coordinator.close_round() == {"malformed": 2, "stale": 1}
    assert coordinator.close_round() == {}


def test_an_evaluation_does_not_wait_for_a_client_that_went_silent_in_the_round(coordinator, clock):
    tokens = {cid: coordinator.join(cid, 10) for cid in CLIENTS}
    open_training(coordinator, clock, deadline_s=30)
    offers = {cid: offer(coordinator, t) for cid, t in tokens.items()}
    for cid in ("a", "b"):
        assert coordinator.submit(coordinator.session(tokens[cid]), 1, offers[cid].nonce, submission(cid))
    clock.now += 31  # c never answers: its process died after fetching the task
    coordinator.close_exchange()
    coordinator.close_round()
    ms = members(*CLIENTS)
    coordinator.open_round(1, Purpose.EVALUATE, ms, clock() + 600)
    messages = {m.slot: EvalRequest(1, torch.zeros(4), m) for m in ms}
    coordinator.open_exchange(Exchange(Phase.EVALUATE, messages, lambda s, r: True), clock() + 600)
    for cid in ("a", "b"):
        found = offer(coordinator, tokens[cid])
        coordinator.submit(coordinator.session(tokens[cid]), 1, found.nonce, EvalReport(cid, 1.0, 1))
    assert coordinator.exchange_done()  # c's session is still within its timeout, but it went silent
