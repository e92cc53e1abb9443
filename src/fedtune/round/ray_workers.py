"""Ray actors as the pool's workers (`round.pool`): `[simulation] backend = "ray"`, here or on a cluster.

Ray is an optional extra (`pip install 'fedtune[ray]'`), imported only when a pool is made. With no
address the pool starts a local Ray for the run (as many CPUs as this process may use, or as the pool
asks for if that is more; no dashboard; the actors' output not copied here) and stops it in `close`;
with an address ("auto": the cluster `ray start` runs here; "host:6379"; "ray://host:10001") it joins
that cluster and leaves it in `close`. A caller that initialised Ray in this process keeps it: the pool
uses it (whatever the address) and leaves it running. Either way `close` kills the pool's actors.

One actor per worker, of `threads` CPUs, sets its torch threads and builds `WorkerJobs` from the recipe
in its constructor. A pool that needs more CPUs than the cluster has is refused before any actor starts;
`start` waits until every new actor is built, and a constructor's exception (a model missing on a node,
say) or an actor still not placed after `START_TIMEOUT_S` stops the run with the reason. Jobs and their
`Done` are pickled here and in the actor (plain bytes through Ray, so torch tensors are copied as they
are); steps are not streamed but come back in `Done.losses`, which the pool replays. A job's exception
comes back as itself with the actor's traceback as a note; an actor that dies (killed, out of memory, its
node lost) fails the clients it held, and `start` makes a new one before the next round.

The base weights are not put in Ray's object store: each actor loads the base model from the model
directory's safetensors file, which transformers memory-maps, so on one machine the weights' pages are
the page cache's, shared by every actor there (once per node). On a cluster every node needs fedtune
installed and the model directory at the same path, and personal adapters are written by the actor that
trained the client, on its node: give `run.dir` on a filesystem every node shares.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from collections.abc import Collection, Sequence
from typing import Any

import torch

from fedtune.round.pool import Died, Event, Finished, Raised, WorkerError, cores, raised_event, raised_message
from fedtune.round.worker import Job, WorkerJobs, WorkerRecipe

START_TIMEOUT_S = 300.0  # for every new actor to be placed and built
INSTALL_HINT = "simulation.backend = \"ray\" needs Ray: pip install 'fedtune[ray]' (or make install-dev)"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise WorkerError(INSTALL_HINT) from None
    return ray


class _Worker:
    """A worker's side, in a Ray actor (`ray.remote` makes the actor class of it when the pool starts)."""

    def __init__(self, recipe: WorkerRecipe, threads: int) -> None:
        torch.set_num_threads(threads)
        self._jobs = WorkerJobs(recipe.build())

    def ready(self) -> int:
        return os.getpid()

    def handle(self, job: bytes) -> bytes:
        """The job's pickled `Done`, or what it raised (pickled when it can be) and its traceback."""
        try:
            answer: tuple[Any, ...] = ("done", self._jobs.handle(pickle.loads(job), on_step=None))
            return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            return pickle.dumps(raised_message(exc))


def _answer(message: tuple[Any, ...]) -> Event:
    if message[0] == "done":
        return Finished(message[1])
    _, payload, trace = message
    return raised_event(payload, trace, "a Ray actor")


def _plain(text: str) -> str:
    """Ray's message without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _died(error: Exception) -> str:
    """How an actor ended, in a line: Ray's message without its list of ids and common causes."""
    text = _plain(getattr(error, "error_msg", None) or str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("\t")]
    pids = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("\tpid:")]
    pid = pids[0] if pids else None
    detail = lines[-1] if lines else type(error).__name__
    detail = detail.split(" Some common causes")[0]
    return f"Ray actor{'' if pid is None else f' (pid {pid})'}: {detail}"


class RayWorkers:
    def __init__(self, recipe: WorkerRecipe, *, size: int, threads: int, address: str | None = None):
        """`size` actors of `threads` CPUs (and torch threads) each; `address` None: a local Ray for the
        run, else the cluster to join (see the module doc). Raises `WorkerError` when Ray is missing."""
        if size < 1 or threads < 1:
            raise ValueError("a pool needs at least one worker of one thread")
        self._ray = _ray()
        self.recipe = recipe
        self.size = size
        self.threads = threads
        self.address = address
        self._owns = False  # this pool initialised Ray (and shuts it down in close)
        self._actor_class: Any = None
        self._actors: dict[int, Any] = {}  # worker -> its actor handle, while it lives
        self._running: dict[int, Any] = {}  # worker -> the ObjectRef of the job it is working on

    def _connect(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            if self.address is None:
                cpus = max(cores(), self.size * self.threads)
                ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
            else:
                try:
                    ray.init(address=self.address, **quiet)
                except Exception as exc:  # Ray raises ConnectionError, RuntimeError, AuthenticationError...
                    reason = _plain(str(exc)).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
                    raise WorkerError(
                        f"simulation.ray_address = {self.address!r}: cannot join that Ray cluster "
                        f"({reason}); start it with `ray start --head`, or leave it out for a local Ray"
                    ) from exc
            self._owns = True
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.size * self.threads:
            raise WorkerError(
                f"simulation.workers = {self.size} of threads_per_worker = {self.threads} need "
                f"{self.size * self.threads} CPUs and the Ray cluster has {cpus:g}: lower "
                "simulation.workers or simulation.threads_per_worker, or add nodes"
            )
        self._actor_class = ray.remote(_Worker).options(num_cpus=self.threads, max_restarts=0)

    def start(self) -> None:
        ray = self._ray
        if self._actor_class is None:
            self._connect()
        starting = [w for w in range(self.size) if w not in self._actors]
        for w in starting:
            self._actors[w] = self._actor_class.remote(self.recipe, self.threads)
        ready = {self._actors[w].ready.remote(): w for w in starting}
        if not ready:
            return
        built, pending = ray.wait(list(ready), num_returns=len(ready), timeout=START_TIMEOUT_S)
        for ref in built:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._drop(ready[ref])
                error = WorkerError(f"a worker could not start: {_started(exc)}")
                error.add_note(_plain(getattr(exc, "error_msg", None) or str(exc)))
                raise error from None
        if pending:
            for ref in pending:
                self._drop(ready[ref])
            raise WorkerError(
                f"{len(pending)} Ray actor(s) of {self.threads} CPU(s) each did not start in "
                f"{START_TIMEOUT_S:.0f} s: are the cluster's CPUs taken by other jobs?"
            )

    def alive(self) -> Sequence[int]:
        return sorted(self._actors)

    def submit(self, worker: int, job: Job) -> None:
        payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        self._running[worker] = self._actors[worker].handle.remote(payload)

    def wait(self, busy: Collection[int]) -> list[tuple[int, Event]]:
        ray = self._ray
        by_ref = {self._running[w]: w for w in busy}
        refs = list(by_ref)
        first, _ = ray.wait(refs, num_returns=1)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        events: list[tuple[int, Event]] = []
        for ref in dict.fromkeys([*first, *done]):
            worker = by_ref[ref]
            del self._running[worker]
            events.append((worker, self._event(worker, ref)))
        return events

    def _event(self, worker: int, ref: Any) -> Event:
        ray = self._ray
        try:
            return _answer(pickle.loads(ray.get(ref)))
        except ray.exceptions.RayTaskError as exc:  # `handle` itself failed (it catches what a job raises)
            return Raised(WorkerError(f"a Ray actor failed: {exc}"))
        except ray.exceptions.RayError as exc:  # the actor died, or its node
            self._drop(worker)
            return Died(_died(exc))

    def _drop(self, worker: int) -> None:
        """Forget a worker's actor (killed, should it still run): `start` makes a new one."""
        actor = self._actors.pop(worker, None)
        self._running.pop(worker, None)
        if actor is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(actor)

    def close(self) -> None:
        for worker in list(self._actors):
            self._drop(worker)
        if self._owns:
            self._ray.shutdown()
            self._owns = False
        self._actor_class = None


def _started(error: Exception) -> str:
    """Why an actor did not start, in a line: its constructor's exception, or how it died."""
    text = _plain(getattr(error, "error_msg", None) or str(error))
    if "creation task" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1]
    return _died(error)
