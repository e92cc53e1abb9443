"""`[simulation] backend = "ray"`: Ray actors give the serial run's adapter bit for bit, plain and secure;
an actor that dies fails the clients it held, and the pool makes a new one for the next round.

The echo recipe below keeps the pool's own tests light: its actors import fedtune's round engine, not
the model and trainers. The full runs take the tiny model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedtune.data import ClientData
from fedtune.round.executor import Lost
from fedtune.round.plan import Member, ParticipantSpec
from fedtune.round.pool import PoolExecutor, WorkerError
from fedtune.round.state import ClientStateStore
from fedtune.round.transport import Phase

ray = pytest.importorskip("ray", reason="Ray cannot be installed here: pip install 'fedtune[ray]'")

from fedtune.round.ray_workers import RayWorkers  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [
    "model.name=tiny",
    "data.max_seq_len=32",
    "data.max_examples_per_client=24",
    "federation.num_clients=6",
    "federation.clients_per_round=4",
    "federation.rounds=2",
    "federation.local_steps=2",
    "lora.target_modules=['q_proj', 'v_proj', 'lm_head']",
    "eval.every=2",
    "run.threads=1",
]
SECURE = [
    "secure_aggregation.enabled=true",
    "secure_aggregation.clip_range=1.0",
    "secure_aggregation.bits=22",
]


def _adapters(sets: list[str], out: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from fedtune.config import load_config
    from fedtune.simulation import simulate

    pool = ["simulation.workers=2", "simulation.threads_per_worker=1"]
    found = {}
    for backend in ("serial", "ray"):
        extra = [f"simulation.backend={backend}", f"run.dir={out / backend}"]
        config = load_config(None, [*TINY, *sets, *extra, *([] if backend == "serial" else pool)])
        result = simulate(config)
        assert [r.failures for r in result.rounds] == [{}] * 3 and result.rounds[-1].clients == 4
        found[backend] = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    return found


def _assert_identical(found: dict[str, dict[str, torch.Tensor]]) -> None:
    serial, pooled = found["serial"], found["ray"]
    assert serial.keys() == pooled.keys() and serial
    assert all(torch.equal(serial[k], pooled[k]) for k in serial)


def test_a_local_ray_of_its_own_gives_the_serial_adapter(tmp_path):
    owned = not ray.is_initialized()  # run first in this file: the backend starts Ray, and stops it after
    _assert_identical(_adapters([], tmp_path))
    if owned:
        assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster():
    """Ray started by the caller: the pool uses it and leaves it running."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_a_secure_round_on_the_callers_ray_gives_the_serial_adapter(cluster, tmp_path):
    _assert_identical(_adapters(SECURE, tmp_path))
    assert ray.is_initialized()


@dataclass(frozen=True)
class Echo:
    """A participant that answers (its client, the message, its pid) after one step of loss 0.5."""

    client_id: str
    recipe: EchoRecipe
    on_step: object

    def respond(self, message: object) -> object:
        marker = Path(self.recipe.marker)
        if self.client_id == self.recipe.die_for and not marker.exists():
            marker.touch()
            os._exit(3)  # the actor's process dies mid-job, as the OOM killer would end it
        if self.client_id == self.recipe.raise_for:
            raise ValueError(f"{self.client_id} refuses {message!r}")
        self.on_step(0.5)  # type: ignore[operator]
        return (self.client_id, message, os.getpid())


@dataclass(frozen=True)
class EchoRecipe:
    marker: str  # made when `die_for`'s actor dies, so its replacement lives
    die_for: str | None = None
    raise_for: str | None = None
    build_fails: bool = False

    def build(self):
        if self.build_fails:
            raise RuntimeError("no model on this node")
        return lambda data, spec, states, on_step: Echo(data.client_id, self, on_step)


MEMBERS = {slot: Member(slot, slot, f"c{slot}") for slot in range(4)}


def _pool(recipe: EchoRecipe, size: int, steps: list[float]) -> PoolExecutor:
    from fedtune.config import load_config
    from fedtune.config.plan import participant_spec

    spec: ParticipantSpec = participant_spec(load_config(None, []))

    def client_for(member: Member) -> tuple[ClientData, ParticipantSpec]:
        return ClientData(member.client_id, train=[[1, 2]], eval=[]), spec

    workers = RayWorkers(recipe, size=size, threads=1)
    return PoolExecutor(workers, client_for, ClientStateStore(), on_step=steps.append)


def _round(pool: PoolExecutor, round_num: int) -> dict[int, object]:
    pool.open_round(round_num, MEMBERS)
    replies = dict(pool.run(Phase.TRAIN, {s: f"r{round_num}" for s in MEMBERS}, lambda _slot: None))
    pool.close_round()
    return replies


def test_a_dead_actor_fails_its_client_and_is_replaced(cluster, tmp_path):
    steps: list[float] = []
    pool = _pool(EchoRecipe(str(tmp_path / "died"), die_for="c1"), 2, steps)
    try:
        first = _round(pool, 1)
        assert isinstance(first[1], Lost) and "its worker died (Ray actor (pid" in first[1].reason
        assert {s: r[:2] for s, r in first.items() if s != 1} == {s: (f"c{s}", "r1") for s in (0, 2, 3)}
        assert list(pool.workers.alive()) == [0] and steps == [0.5] * 3
        second = _round(pool, 2)  # a new actor took the dead one's place
        assert {s: r[:2] for s, r in second.items()} == {s: (f"c{s}", "r2") for s in MEMBERS}
        assert list(pool.workers.alive()) == [0, 1] and len({r[2] for r in second.values()}) == 2
        assert first[0][2] in {r[2] for r in second.values()}  # the one that lived is the same process
    finally:
        pool.close()
    assert ray.is_initialized()


def test_a_jobs_exception_is_raised_as_itself_with_the_actors_traceback(cluster, tmp_path):
    pool = _pool(EchoRecipe(str(tmp_path / "unused"), raise_for="c2"), 1, [])
    try:
        with pytest.raises(ValueError, match="c2 refuses 'r1'") as caught:
            _round(pool, 1)
        notes = "\n".join(caught.value.__notes__)
        assert "raised in a Ray actor" in notes and "in respond" in notes
    finally:
        pool.close()


def test_an_actor_that_cannot_build_stops_the_run_with_the_reason(cluster, tmp_path):
    pool = _pool(EchoRecipe(str(tmp_path / "unused"), build_fails=True), 1, [])
    try:
        with pytest.raises(WorkerError, match=r"could not start: RuntimeError: no model on this node"):
            pool.open_round(1, MEMBERS)
    finally:
        pool.close()


def test_a_pool_larger_than_the_cluster_is_refused_before_any_actor_starts(cluster, tmp_path):
    workers = RayWorkers(EchoRecipe(str(tmp_path / "unused")), size=2, threads=2)
    try:
        with pytest.raises(WorkerError, match=r"need 4 CPUs and the Ray cluster has 2: lower simulation"):
            workers.start()
        assert workers.alive() == []
    finally:
        workers.close()
