"""A simulation executor over a pool of workers: several clients train at once, the results do not change.

`PoolExecutor` schedules; `Workers` runs jobs (`round.processes`: worker processes on this machine;
`round.ray_workers`: Ray actors). Each idle worker takes the next slot in slot order; the worker that
first took a slot in a round keeps it for the round's later phases (a secure round's SecAgg+ client lives
there), and in a secure round each worker takes an equal share of the slots, since every slot trains at
the masked-input stage. Every client trains from its own seeds and its own state, with the worker's fixed
torch threads, and the transport delivers replies in slot order, so the global adapter is the serial
run's, bit for bit, when the serial run trains with the same number of threads.

A worker that dies fails the clients it held in the round (`Lost`: the transport reports each as a failed
client) and the round goes on with the others; the pool starts a new worker in its place before the next
round. A worker that cannot start stops the run with the reason; an exception in a worker is raised here,
with the worker's traceback, as the serial run would have raised it.
"""

from __future__ import annotations

import math
import os
import pickle
import traceback
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedtune.data import ClientData
from fedtune.errors import FedtuneError
from fedtune.round.executor import Lost
from fedtune.round.plan import Member, ParticipantSpec
from fedtune.round.state import ClientStateStore
from fedtune.round.transport import Phase
from fedtune.round.worker import ClientJob, Done, Job


def cores() -> int:
    """The cores this process may run on (what `simulation.workers = "auto"` counts)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class WorkerError(FedtuneError):
    """A worker could not start, or every worker is gone."""


@dataclass(frozen=True)
class Step:
    loss: float


@dataclass(frozen=True, eq=False)
class Finished:
    done: Done


@dataclass(frozen=True)
class Died:
    reason: str  # how the worker ended, for the clients it held


@dataclass(frozen=True, eq=False)
class Raised:
    error: BaseException  # what a job raised in the worker, its traceback as a note


Event = Step | Finished | Died | Raised


def raised_message(exc: BaseException) -> tuple[str, bytes | None, str]:
    """What a worker sends when a job raised: the exception pickled (when it can be) and its traceback."""
    try:
        payload: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        payload = None
    return ("raised", payload, "".join(traceback.format_exception(exc)))


def raised_event(payload: bytes | None, trace: str, where: str) -> Raised:
    """The exception a worker (`where`: "a worker process", "a Ray actor") sent, with its traceback as a
    note; a `WorkerError` with the traceback when it could not be pickled."""
    error: BaseException = WorkerError(f"{where} failed:\n{trace}")
    if payload is not None:
        try:
            error = pickle.loads(payload)
            error.add_note(f"raised in {where}:\n{trace}")
        except Exception:
            pass
    return Raised(error)


class Workers(Protocol):
    def start(self) -> None:
        """Start the workers that are not running (all at first, a dead one's replacement later);
        raises `WorkerError` when one cannot start."""
        ...

    def alive(self) -> Sequence[int]:
        """The ids of the running workers."""
        ...

    def submit(self, worker: int, job: Job) -> None: ...

    def wait(self, busy: Collection[int]) -> list[tuple[int, Event]]:
        """Block until some of the `busy` workers have news."""
        ...

    def close(self) -> None: ...


class PoolExecutor:
    def __init__(
        self,
        workers: Workers,
        client_for: Callable[[Member], tuple[ClientData, ParticipantSpec]],
        states: ClientStateStore,
        *,
        on_step: Callable[[float], None] = lambda _loss: None,
    ) -> None:
        """`client_for(member)` gives the client's data and spec for its first job of a round; `states`
        is the engine's client-state store (what each job's client starts from, and adopts after)."""
        self.workers = workers
        self.client_for = client_for
        self.states = states
        self.on_step = on_step
        self._opening = 0
        self._members: Mapping[int, Member] = {}
        self._holder: dict[int, int] = {}  # slot -> the worker holding its participant this round
        self._dead: dict[int, str] = {}  # workers that died this round -> why

    def open_round(self, round_num: int, members: Mapping[int, Member]) -> None:
        self.workers.start()
        self._opening += 1
        self._members, self._holder, self._dead = members, {}, {}

    def run(
        self, phase: Phase, messages: Mapping[int, object], started: Callable[[int], None]
    ) -> Iterator[tuple[int, object]]:
        alive = list(self.workers.alive())
        cap = math.ceil(len(self._members) / len(alive)) if phase.secagg_stage is not None and alive else None
        held = {w: sum(1 for h in self._holder.values() if h == w) for w in alive}
        free: deque[int] = deque()
        pinned: dict[int, deque[int]] = {w: deque() for w in alive}
        for slot in sorted(messages):
            worker = self._holder.get(slot)
            if worker is None:
                free.append(slot)
            elif worker in pinned:
                pinned[worker].append(slot)
            else:
                yield slot, self._lost(worker)
        busy: dict[int, int] = {}  # worker -> the slot it is working on
        while free or busy or any(pinned.values()):
            for worker in alive:
                if worker in busy or worker in self._dead:
                    continue
                queue, first = pinned[worker], False
                if queue:
                    slot = queue.popleft()
                elif free and (cap is None or held[worker] < cap):
                    slot, first = free.popleft(), True
                    self._holder[slot], held[worker] = worker, held[worker] + 1
                else:
                    continue
                started(slot)
                self.workers.submit(worker, self._job(slot, messages[slot], first))
                busy[worker] = slot
            if not busy:  # nobody is left to take the rest
                for slot in free:
                    yield slot, Lost("no worker process was left to train it")
                return
            for worker, event in self.workers.wait(list(busy)):
                if isinstance(event, Step):
                    self.on_step(event.loss)
                elif isinstance(event, Finished):
                    busy.pop(worker)
                    yield event.done.slot, self._finish(event.done)
                elif isinstance(event, Died):
                    self._dead[worker], cap = event.reason, None  # the others take the free slots now
                    slot = busy.pop(worker, None)
                    for lost in ([] if slot is None else [slot]) + list(pinned[worker]):
                        yield lost, self._lost(worker)
                    pinned[worker].clear()
                else:
                    raise event.error

    def _job(self, slot: int, message: object, first: bool) -> Job:
        """The job; a slot's first of the round brings its client (data, spec, state)."""
        client = None
        if first:
            member = self._members[slot]
            data, spec = self.client_for(member)
            client = ClientJob(member, data, spec, self.states.export(member.client_id))
        return Job(self._opening, slot, message, client)

    def _finish(self, done: Done) -> object:
        for loss in done.losses:
            self.on_step(loss)
        if done.state is not None:
            self.states.adopt(self._members[done.slot].client_id, done.state)
        return done.reply

    def _lost(self, worker: int) -> Lost:
        return Lost(f"its worker died ({self._dead[worker]})")

    def close_round(self) -> None:
        pass  # a worker drops the round's participants when the next round's first job reaches it

    def close(self) -> None:
        self.workers.close()
