"""Parallel simulation: a pool of worker processes trains the serial run's clients, bit for bit.

Serial with one torch thread and `processes` with two workers of one thread give the same global adapter
(plain, secure, and with error feedback and personal adapters kept between rounds); a worker killed in a
round fails the client it held and the run goes on; the pool's ordering and loss handling on a pool of
synchronous workers that finish in reverse order; what `[simulation]` refuses.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection, Sequence

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.data import ClientData
from fedtune.errors import ConfigError
from fedtune.round.inprocess import InProcessTransport
from fedtune.round.messages import Submission, TrainRequest
from fedtune.round.plan import Member
from fedtune.round.pool import Died, Event, Finished, PoolExecutor
from fedtune.round.state import ClientState, ClientStateStore
from fedtune.round.transport import Exchange, Phase, Purpose
from fedtune.round.worker import Job, WorkerJobs
from fedtune.simulation import Silent, run_setup, setup, simulate
from tests.test_simulation import SMALL

POOL = ["simulation.backend=processes", "simulation.workers=2", "simulation.threads_per_worker=1"]
SERIAL = ["simulation.backend=serial", "run.threads=1"]
CASES = {
    "plain": [],
    "secure": ["secure_aggregation.enabled=true", "secure_aggregation.clip_range=1.0"],
    "stateful": ["compression.method=topk", "compression.fraction=0.2", "personalize.method=ditto"],
}


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_worker_processes_give_the_serial_adapter_bit_for_bit(case, tmp_path):
    extra = [*SMALL, *CASES[case], "federation.rounds=2"]
    serial = simulate(load_config(None, [*extra, *SERIAL, f"run.dir={tmp_path / 's'}"]))
    pooled = simulate(load_config(None, [*extra, *POOL, f"run.dir={tmp_path / 'p'}"]))
    a, b = adapter(serial), adapter(pooled)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for s, p in zip(serial.rounds, pooled.rounds, strict=True):
        assert (s.clients, s.client_ids, s.failures) == (p.clients, p.client_ids, p.failures)
        assert s.eval is None or s.eval.per_client_loss == p.eval.per_client_loss
    assert serial.after.loss < serial.before.loss  # the runs trained
    if case == "stateful":  # ditto's personal adapters came back from the workers and were saved
        assert serial.after.personal.per_client_loss == pooled.after.personal.per_client_loss
        assert (pooled.run_dir / "personal").is_dir()


class KillsItsWorker:
    """A recipe whose participants SIGKILL their own worker process when they are sent the training
    task of `round_num` in slot 0 (a forked worker inherits it; a fork server would import it from here)."""

    def __init__(self, inner, round_num: int) -> None:
        self.inner, self.round_num = inner, round_num

    def build(self):
        factory = self.inner.build()

        def make(data, spec, states, on_step):
            return _Dies(factory(data, spec, states, on_step), self.round_num)

        return make


class _Dies:
    def __init__(self, inner, round_num: int) -> None:
        self.inner, self.round_num = inner, round_num

    def respond(self, message):
        training = isinstance(message, TrainRequest) and message.task.round_num == self.round_num
        if training and message.member.slot == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.respond(message)


@pytest.mark.slow
def test_a_killed_worker_fails_its_client_and_not_the_run(tmp_path):
    config = load_config(None, [*SMALL, *POOL, "federation.clients_per_round=4", f"run.dir={tmp_path}"])
    s = setup(config, Silent(), lambda _msg: None)
    workers = s.transport.executor.workers
    workers.recipe = KillsItsWorker(workers.recipe, round_num=2)
    try:
        result = run_setup(s, Silent(), 0.0)
    finally:
        s.close()
    killed = result.rounds[2]
    assert len(killed.failures) == 1 and killed.clients == 3 and killed.failed is None
    (why,) = killed.failures.values()
    assert "killed by SIGKILL" in why
    for r in (result.rounds[1], result.rounds[3]):  # before, and after its replacement started
        assert r.clients == 4 and not r.failures
    assert result.after.clients == 6  # the last evaluation heard every client again


# ---- the pool's scheduling, on synchronous workers ------------------------------------------------


class Echo:
    """A participant that answers a training task with an empty submission and counts its rounds in
    its state."""

    def __init__(self, data: ClientData, states: ClientStateStore) -> None:
        self.client_id, self.states = data.client_id, states

    def respond(self, message):
        round_num = message.task.round_num
        state = self.states.begin(self.client_id, round_num)
        self.states.commit(self.client_id, round_num, ClientState(dpsgd_steps=state.dpsgd_steps + 1))
        return Submission(None, None)  # type: ignore[arg-type]


class Reversed:
    """`Workers` run in this process: each `wait` finishes the busy workers' jobs, last worker first;
    `dies` names a worker that dies on its next job."""

    def __init__(self, size: int, dies: int | None = None) -> None:
        echo = lambda data, spec, states, on_step: Echo(data, states)  # noqa: E731
        self.jobs = {w: WorkerJobs(echo) for w in range(size)}
        self.pending: dict[int, Job] = {}
        self.dies = dies
        self.order: list[int] = []  # slots in the order they finished

    def start(self) -> None: ...

    def alive(self) -> Sequence[int]:
        return list(self.jobs)

    def submit(self, worker: int, job: Job) -> None:
        self.pending[worker] = job

    def wait(self, busy: Collection[int]) -> list[tuple[int, Event]]:
        events: list[tuple[int, Event]] = []
        for worker in sorted(busy, reverse=True):
            job = self.pending.pop(worker)
            if worker == self.dies:
                self.jobs.pop(worker)
                events.append((worker, Died("killed for the test")))
                continue
            self.order.append(job.slot)
            events.append((worker, Finished(self.jobs[worker].handle(job))))
        return events

    def close(self) -> None: ...


def _exchange(workers: Reversed, states: ClientStateStore, clients: Sequence[str]):
    members = [Member(i, i, cid) for i, cid in enumerate(clients)]
    pool = PoolExecutor(workers, lambda m: (ClientData(m.client_id, [], []), None), states)  # type: ignore[arg-type]
    transport = InProcessTransport(executor=pool)
    delivered: list[tuple[int, object]] = []
    task = type("Task", (), {"round_num": 1})()
    messages = {m.slot: type("Msg", (), {"task": task, "member": m})() for m in members}
    transport.open_round(1, Purpose.TRAIN, members)
    deliver = lambda slot, reply: delivered.append((slot, reply)) or True  # noqa: E731
    done = transport.exchange(Exchange(Phase.TRAIN, messages, deliver))
    transport.close_round()
    return delivered, done


def test_replies_reach_the_engine_in_slot_order_and_states_come_back():
    workers, states = Reversed(2), ClientStateStore()
    delivered, done = _exchange(workers, states, ["a", "b", "c", "d", "e"])
    assert workers.order != sorted(workers.order)  # they finished out of order ...
    assert [slot for slot, _ in delivered] == [0, 1, 2, 3, 4]  # ... and were delivered in order
    assert done.answered == {0, 1, 2, 3, 4}
    assert all(states.get(c).dpsgd_steps == 1 for c in "abcde")  # each worker's commit was adopted


def test_a_dead_workers_client_is_a_failed_submission():
    workers, states = Reversed(2, dies=1), ClientStateStore()
    delivered, _ = _exchange(workers, states, ["a", "b", "c", "d"])
    lost = [(slot, r) for slot, r in delivered if isinstance(r, Submission) and r.report is not None]
    assert [slot for slot, _ in delivered] == [0, 1, 2, 3]
    assert [slot for slot, _ in lost] == [1]  # worker 1 held slot 1 when it died; the rest went to worker 0
    assert lost[0][1].update is None and "killed for the test" in lost[0][1].report.error
    assert states.get("b").dpsgd_steps == 0 and states.get("c").dpsgd_steps == 1


# ---- what [simulation] refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["simulation.backend=serial", "simulation.workers=2"],
            r"simulation\.workers = 2 with simulation\.ba",
        ),
        (
            ["simulation.backend=serial", "simulation.threads_per_worker=2"],
            r"simulation\.threads_per_worker = 2",
        ),
        (["simulation.ray_address=auto"], r"simulation\.ray_address = 'auto' with simulation\.backend"),
        (["simulation.backend=threads"], r"simulation\.backend"),
    ],
)
def test_settings_a_backend_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_deployment_refuses_a_simulation_backend():
    from fedtune.config import check

    sites = "deploy.clients=['a', 'b', 'c', 'd']"
    assert check(load_config(None, [sites]), "deploy") == []  # the default [simulation] is no setting
    for pool in (POOL, ["simulation.backend=ray"], ["simulation.backend=serial"]):
        with pytest.raises(ConfigError, match="remove \\[simulation\\] for fedtune server"):
            check(load_config(None, [*pool, sites]), "deploy")


def test_auto_is_one_worker_per_core_with_the_cores_shared():
    config = load_config(None, []).simulation
    assert config.backend == "processes"  # the default: faster on the default job (bench/parallel.py)
    assert config.pool(8) == (8, 1)
    assert config.model_copy(update={"workers": 2}).pool(8) == (2, 4)
    assert config.model_copy(update={"workers": 3, "threads_per_worker": 2}).pool(8) == (3, 2)


def test_a_forked_worker_draws_its_own_noise(tiny_dir, tokenizer, tmp_path):
    """DP-SGD's generators and distributed DP's share generator are made again in each forked worker:
    copies of the parent's would add the same noise in every worker."""
    from fedtune.local import load_model
    from fedtune.simulation.workers import ClientFactory, Inherited

    config = load_config(None, ["model.name=tiny", "dpsgd.enabled=true", *POOL])
    local = load_model(config, tiny_dir, tokenizer.pad_token_id)
    parent = ClientFactory.over(config, local, tiny_dir, tmp_path, np.random.default_rng(0))
    worker = Inherited(config, parent).build()
    assert worker.local is parent.local  # the model itself is shared ...
    assert worker.trainer is not parent.trainer  # ... not the noise
    assert worker.noise_rng is not parent.noise_rng
    draws = [f.trainer.noise_generator.initial_seed() for f in (parent, worker)]
    assert draws[0] != draws[1]
    assert parent.noise_rng.random() != worker.noise_rng.random()
