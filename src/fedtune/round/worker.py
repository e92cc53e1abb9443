"""What a worker of a simulation pool runs: jobs in, replies out, the same in a process and a Ray actor.

A worker is built once per run from a `WorkerRecipe` (picklable: the simulation's holds the config and
the model's directory; `build()` loads the base model and makes the trainers there). A `Job` is one
message for one slot of the open round; the slot's first job of a round also carries its client (`ClientJob`:
its data, its participant spec and its state, exported from the engine's client-state store). The worker
keeps that participant until the round closes, so a secure round's four stages meet the same SecAgg+
client, and answers each job with a `Done`: the reply, and the client's state when the job changed it,
for the engine's store to adopt. What crosses between the parent and a worker is pickled by fedtune's own
code on both sides of one machine's pipe (or Ray's object store): never a network peer's bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedtune.data import ClientData
from fedtune.round.executor import Responder
from fedtune.round.plan import Member, ParticipantSpec
from fedtune.round.state import ClientStateStore, StateEntry


class ParticipantFactory(Protocol):
    def __call__(
        self,
        data: ClientData,
        spec: ParticipantSpec,
        states: ClientStateStore,
        on_step: Callable[[float], None],
    ) -> Responder:
        """A participant for this client over the worker's model."""
        ...


class WorkerRecipe(Protocol):
    def build(self) -> ParticipantFactory:
        """Load what trains (the base model, the trainers) in this worker, once."""
        ...


@dataclass(frozen=True, eq=False)
class ClientJob:
    """A client, as its slot's first job of a round brings it to a worker."""

    member: Member
    data: ClientData
    spec: ParticipantSpec
    state: StateEntry | None  # the client's entry in the engine's store (None: no state yet)


@dataclass(frozen=True, eq=False)
class Job:
    opening: int  # which opened round it belongs to (the pool counts them: an evaluation is a round too)
    slot: int
    message: object
    client: ClientJob | None = None  # with the slot's first job of the round


@dataclass(frozen=True, eq=False)
class Done:
    slot: int
    reply: object
    state: StateEntry | None  # the client's new entry, when the job changed it (None: unchanged)
    losses: tuple[float, ...]  # the training steps' losses, for a worker that cannot stream them


@dataclass
class _Held:
    participant: Responder
    client_id: str
    states: ClientStateStore


class WorkerJobs:
    """A worker's side of the pool: the participants of the open round, by slot."""

    def __init__(self, factory: ParticipantFactory) -> None:
        self.factory = factory
        self._opening: int | None = None
        self._held: dict[int, _Held] = {}
        self._step: Callable[[float], None] = lambda _loss: None  # the current job's

    def _emit(self, loss: float) -> None:
        self._step(loss)

    def handle(self, job: Job, on_step: Callable[[float], None] | None = None) -> Done:
        """Answer one job; `on_step(loss)` streams the steps (None: they come back in `Done.losses`)."""
        if job.opening != self._opening:
            self._opening, self._held = job.opening, {}
        losses: list[float] = []
        self._step = losses.append if on_step is None else on_step
        held = self._held.get(job.slot)
        if job.client is not None:
            client, client_id = job.client, job.client.member.client_id
            states = ClientStateStore()
            states.adopt(client_id, client.state)
            participant = self.factory(client.data, client.spec, states, self._emit)
            held = self._held[job.slot] = _Held(participant, client_id, states)
        if held is None:
            raise RuntimeError(f"a job for slot {job.slot} reached a worker that does not hold its client")
        before = held.states.export(held.client_id)
        reply = held.participant.respond(job.message)
        after = held.states.export(held.client_id)
        return Done(job.slot, reply, None if after is before else after, tuple(losses))
