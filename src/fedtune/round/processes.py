"""Worker processes on this machine, for the pool (`round.pool`): `[simulation] backend = "processes"`.

Each worker is started once per run and built from its recipe; the base model's weights are in memory
once however many workers there are, since transformers memory-maps them from the model's safetensors
file and a mapped file's pages are the page cache's, shared by every process that maps them. A worker's
own memory is its LoRA parameters, optimizer state, activations and what its interpreter writes.

How a worker starts (`start_method`): "fork" copies this process, which has loaded the model and the data
already (the recipe is then the simulation's own participant factory, inherited, not pickled): it starts
at once and shares every page it does not write (the parent freezes its garbage collector's objects for
the fork, so that collecting does not write them). A forked worker must train with one torch thread:
OpenMP's thread pool does not survive a fork, and a child that asks it for more threads than one hangs.
"forkserver" (for more threads per worker, or off Linux): a fresh interpreter that imported torch and
fedtune once forks each worker from itself; the worker builds from a picklable recipe (loads the model
from its file, mapped). Workers set their torch threads and talk to the parent over a pipe: pickled
jobs in, pickled events out (each training step's loss, the job's `Done`, or the exception it raised).
A worker that dies (killed, out of memory) closes its pipe; its exit code or signal is the reason given
to the clients it held. Workers ignore SIGINT: Ctrl-C stops the parent, which stops them.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import pickle
import signal
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from fedtune.round.pool import Died, Event, Finished, Raised, Step, WorkerError, raised_event, raised_message
from fedtune.round.worker import Job, WorkerJobs, WorkerRecipe

PRELOAD = ["torch", "transformers", "peft", "fedtune.local"]  # imported once by the fork server
STOP_TIMEOUT_S = 10.0


def _send(conn: Connection, event: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL))


def serve(conn: Connection, recipe: WorkerRecipe, threads: int) -> None:
    """A worker's life: build from the recipe, say ready, answer jobs until the parent stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        jobs = WorkerJobs(recipe.build())
    except BaseException as exc:
        _send(conn, raised_message(exc))
        return
    _send(conn, ("ready",))
    while True:
        try:
            job = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if job is None:
            return
        try:
            done = jobs.handle(job, on_step=lambda loss: _send(conn, ("step", loss)))
        except BaseException as exc:
            _send(conn, raised_message(exc))
            return
        _send(conn, ("done", done))


def _event(message: tuple[Any, ...]) -> Event:
    kind = message[0]
    if kind == "step":
        return Step(message[1])
    if kind == "done":
        return Finished(message[1])
    _, payload, trace = message
    return raised_event(payload, trace, "a worker process")


def _ended(process: multiprocessing.process.BaseProcess) -> str:
    process.join(STOP_TIMEOUT_S)
    code = process.exitcode
    if code is None:
        return f"worker process {process.pid} stopped answering"
    if code < 0:
        return f"worker process {process.pid} was killed by {signal.Signals(-code).name}"
    return f"worker process {process.pid} exited with code {code}"


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    alive: bool = True


class ProcessWorkers:
    def __init__(self, recipe: WorkerRecipe, *, size: int, threads: int, start_method: str = "forkserver"):
        """`size` workers of `threads` torch threads each; `start_method` "fork" (one thread only),
        "forkserver" or "spawn" (see the module doc)."""
        if size < 1 or threads < 1:
            raise ValueError("a pool needs at least one worker of one thread")
        if start_method == "fork" and threads != 1:
            raise ValueError("a forked worker trains with one torch thread (OpenMP does not survive a fork)")
        self.start_method = start_method
        self.recipe = recipe
        self.size = size
        self.threads = threads
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(PRELOAD)
        self._workers: dict[int, _Worker] = {}

    def start(self) -> None:
        starting = [w for w in range(self.size) if w not in self._workers or not self._workers[w].alive]
        if not starting:
            return
        forking = self.start_method == "fork"
        if forking:
            gc.collect()
            gc.freeze()  # what exists now stays shared: the child's collector leaves it alone
        try:
            for w in starting:
                parent_end, child_end = self._context.Pipe(duplex=True)
                process = self._context.Process(
                    target=serve, args=(child_end, self.recipe, self.threads), name=f"fedtune-worker-{w}"
                )
                process.daemon = True
                process.start()
                child_end.close()  # before the next fork: a worker's death must close its pipe's last end
                self._workers[w] = _Worker(process, parent_end)
        finally:
            if forking:
                gc.unfreeze()
        for w in starting:
            worker = self._workers[w]
            try:
                message = pickle.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):
                worker.alive = False
                raise WorkerError(f"a worker could not start: {_ended(worker.process)}") from None
            if message[0] != "ready":
                worker.alive = False
                error = _event(message)
                assert isinstance(error, Raised)
                raise WorkerError(f"a worker could not start: {error.error}") from error.error

    def alive(self) -> Sequence[int]:
        return [w for w, worker in sorted(self._workers.items()) if worker.alive]

    def pid(self, worker: int) -> int | None:
        return self._workers[worker].process.pid

    def submit(self, worker: int, job: Job) -> None:
        with contextlib.suppress(OSError):  # it died: `wait` reports it
            self._workers[worker].conn.send_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))

    def wait(self, busy: Collection[int]) -> list[tuple[int, Event]]:
        by_conn = {self._workers[w].conn: w for w in busy}
        events: list[tuple[int, Event]] = []
        for conn in wait(list(by_conn)):
            worker = by_conn[conn]  # type: ignore[index]
            try:
                while True:
                    events.append((worker, _event(pickle.loads(conn.recv_bytes()))))
                    if not conn.poll():
                        break
            except (EOFError, OSError):
                self._workers[worker].alive = False
                conn.close()
                events.append((worker, Died(_ended(self._workers[worker].process))))
        return events

    def close(self) -> None:
        for worker in self._workers.values():
            if worker.alive:
                with contextlib.suppress(OSError):
                    worker.conn.send_bytes(pickle.dumps(None))
        for worker in self._workers.values():
            worker.process.join(STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = {}
