"""The round engine's transport over gRPC: exchanges become tasks and polls that the sites fetch.

The engine's calls run on the server's main thread; the sites' calls arrive on gRPC's handler threads and
meet them in the `Coordinator`. `open_round` waits for `deploy.min_connected` clients (or
`deploy.wait_for_clients_s`) and opens the round; `exchange` publishes one phase's messages (a task
through GetTask, a SecAgg+ stage message through a poll) and waits on the coordinator's condition until
the phase is done or its deadline: the training phases until `deploy.round_timeout_s` after the round
opened, each key or unmasking stage `deploy.stage_timeout_s`, an evaluation `deploy.eval_timeout_s`.
Setting `stop` interrupts the wait (`Interrupted`), and the round in flight is not finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

from fedtune.round.plan import Member
from fedtune.round.transport import Exchange, Exchanged, Interrupted, Phase, Purpose
from fedtune.transport.coordinator import Coordinator
from fedtune.transport.settings import DeployConfig

WAIT_SLICE_S = 0.1


class GrpcTransport:
    def __init__(
        self,
        coordinator: Coordinator,
        settings: DeployConfig,
        *,
        stop: threading.Event,
        on_open: Callable[[int, list[str]], None] = lambda _round, _clients: None,
        notify: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        """`on_open(round, client_ids)` is told when a training round opens (the server's state file)."""
        self.coordinator = coordinator
        self.settings = settings
        self.stop = stop
        self.on_open = on_open
        self.notify = notify
        self._round_deadline = 0.0

    def _wait(self, done: Callable[[], bool], deadline: float) -> None:
        c = self.coordinator
        with c.condition:
            while not self.stop.is_set() and not done() and c.clock() < deadline:
                c.condition.wait(min(WAIT_SLICE_S, max(0.0, deadline - c.clock())))
        if self.stop.is_set():
            raise Interrupted("the server was asked to stop")

    def wait_connected(self) -> int:
        """Wait until `deploy.min_connected` clients are live (or the wait times out); how many are."""
        c, dep = self.coordinator, self.settings
        count = len(c.allowed) if dep.min_connected == "all" else dep.min_connected
        self._wait(lambda: len(c.live_clients()) >= count, c.clock() + dep.wait_for_clients_s)
        return len(c.live_clients())

    def open_round(self, round_num: int, purpose: Purpose, members: Sequence[Member]) -> None:
        live = self.wait_connected()
        c, dep = self.coordinator, self.settings
        timeout = dep.round_timeout_s if purpose == Purpose.TRAIN else dep.eval_timeout_s
        self._round_deadline = c.clock() + timeout
        if purpose == Purpose.TRAIN:
            self.on_open(round_num, [m.client_id for m in members])
            self.notify(f"round {round_num}: selected {len(members)} of {len(c.allowed)} ({live} connected)")
        c.open_round(round_num, purpose, members, self._round_deadline)

    def exchange(self, exchange: Exchange) -> Exchanged:
        c = self.coordinator
        if exchange.phase.trains or exchange.phase == Phase.EVALUATE:
            deadline = self._round_deadline
        else:
            deadline = c.clock() + self.settings.stage_timeout_s
        c.open_exchange(exchange, deadline)
        try:
            self._wait(c.exchange_done, deadline)
        finally:
            done = c.close_exchange()
        return done

    def close_round(self, outcome: str | None = None) -> Mapping[str, int]:
        return self.coordinator.close_round(outcome)
