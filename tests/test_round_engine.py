"""The round engine on its own: scripted participants over the in-process transport, known answers.

One weight rule, the failure policy (fewer than `min_clients` updates), client-level DP releasing its
noised sum whoever answered, the budget stop with the last round evaluated, a user's own rule refused
where only sums exist, and the client-state store a site needs to repeat a round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.aggregate import ServerSGD, make_aggregator, weighted_mean
from fedtune.aggregate.aggregator import Aggregator
from fedtune.aggregate.settings import ServerConfig
from fedtune.compress import CompressionSpec
from fedtune.errors import ConfigError, StateError
from fedtune.privacy.accountant import Sampling
from fedtune.privacy.dpfedavg import ClientLevelDp
from fedtune.privacy.plan import PrivacyPlan
from fedtune.round.engine import RoundEngine
from fedtune.round.inprocess import InProcessTransport
from fedtune.round.messages import (
    ClientReport,
    DenseUpdate,
    EvalReport,
    EvalRequest,
    Submission,
    TrainRequest,
)
from fedtune.round.plan import DpRandomness, RunPlan, SecureSettings, WeightRule
from fedtune.round.state import ClientState, ClientStateStore

NUMEL = 3


class Scripted:
    """A participant that sends a fixed delta, claims `examples` training examples, and evaluates to a
    loss that is the adapter's first value."""

    def __init__(self, cid: str, delta: list[float] | None, examples: int) -> None:
        self.cid, self.delta, self.examples = cid, delta, examples

    def respond(self, message: object) -> object:
        if isinstance(message, EvalRequest):
            return EvalReport(self.cid, float(message.global_flat[0]) * 2 + 10.0, 2)
        assert isinstance(message, TrainRequest)
        if self.delta is None:
            return Submission(ClientReport(self.cid, self.examples, 1, float("nan"), error="nan loss"), None)
        return Submission(
            ClientReport(self.cid, self.examples, 1, 1.0), DenseUpdate(torch.tensor(self.delta))
        )


def plan(population: tuple[str, ...], **changes) -> RunPlan:
    base = dict(
        seed=0,
        rounds=2,
        population=population,
        cohort=len(population),
        selected=len(population),
        min_clients=1,
        eval_every=2,
        eval_members=tuple(range(len(population))),
        weights=WeightRule(cap=100),
        compression=CompressionSpec("none"),
        adapter_numel=NUMEL,
    )
    return RunPlan(**{**base, **changes})


def engine(scripts: dict[str, Scripted], run_plan: RunPlan, **options) -> RoundEngine:
    transport = InProcessTransport(lambda m: scripts[m.client_id])
    aggregator = Aggregator(weighted_mean, ServerSGD(lr=1.0))
    return RoundEngine(run_plan, transport, aggregator, torch.zeros(NUMEL), **options)


def test_weights_are_the_capped_examples_and_every_round_is_typed():
    scripts = {"a": Scripted("a", [1.0, 0.0, 0.0], 10), "b": Scripted("b", [0.0, 1.0, 0.0], 1000)}
    e = engine(scripts, plan(("a", "b"), rounds=1))
    before, first = list(e.run())
    assert (
        before.round_num == 0 and before.eval is not None and before.eval.loss == 5.0
    )  # nll 10 over 2 tokens
    # b claims 1000 examples; the public cap is 100: weights 10 and 100
    assert torch.allclose(e.global_flat, torch.tensor([10 / 110, 100 / 110, 0.0]))
    assert first.clients == 2 and first.client_ids == ("a", "b") and first.failed is None
    assert first.bytes_up == 2 * NUMEL * 4 and first.bytes_down == 2 * NUMEL * 4
    assert first.eval is not None and first.eval.clients == 2  # the last round is always evaluated
    assert first.eval.loss == pytest.approx(5.0 + 10 / 110)
    row = first.to_row()
    assert row["round_failed"] is None and row["client_ids"] == ["a", "b"] and "epsilon" not in row


def test_too_few_updates_fail_the_round_and_leave_the_adapter():
    scripts = {"a": Scripted("a", [1.0, 1.0, 1.0], 10), "b": Scripted("b", None, 10)}
    e = engine(scripts, plan(("a", "b"), rounds=1, min_clients=2))
    _, first = list(e.run())
    assert first.failed is not None and "federation.min_clients = 2" in first.failed
    assert torch.equal(e.global_flat, torch.zeros(NUMEL))
    assert first.failures == {"b": "nan loss"} and first.stragglers == ()
    assert first.clients == 1


def dp_plan(cohort: int, **changes) -> PrivacyPlan:
    base = dict(
        mode="central",
        sampling=Sampling("fixed", cohort, cohort),
        accountant="rdp",
        delta=1e-3,
        noise_multiplier=1.0,
        target_epsilon=None,
        clip_l2_norm=1.0,
        adaptive_clipping=False,
        target_quantile=0.5,
        clip_lr=0.2,
        clipped_count_stddev=None,
        delta_noise_multiplier=1.0,
    )
    return PrivacyPlan(**{**base, **changes})


def private(scripts, privacy: PrivacyPlan, **changes) -> RoundEngine:
    run_plan = plan(tuple(scripts), privacy=privacy, weights=WeightRule(cap=100, unit=True), **changes)
    randomness = DpRandomness(
        torch.Generator().manual_seed(0), np.random.default_rng(1), np.random.default_rng(2)
    )
    dp = ClientLevelDp(privacy, randomness.noise)
    return engine(scripts, run_plan, dp=dp, dp_randomness=randomness)


def test_under_dp_every_round_releases_its_noised_sum_over_the_public_cohort():
    scripts = {"a": Scripted("a", [3.0, 4.0, 0.0], 50), "b": Scripted("b", None, 50)}
    e = private(scripts, dp_plan(2), rounds=1)
    _, first = list(e.run())
    assert first.failed is None and first.clients == 1  # b's refusal counts as a zero delta
    assert first.client_ids is None  # who took part is not published
    assert first.privacy is not None and first.privacy.epsilon > 0 and first.privacy.noise_std == 1.0
    # a's delta clipped to C = 1 by the server: (0.6, 0.8, 0); plus N(0, 1) noise; over the cohort of 2
    noise = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    expected = (torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64) + noise.double()) / 2
    assert torch.allclose(e.global_flat, expected.float(), atol=1e-6)


def test_the_budget_stops_the_run_before_it_is_exceeded_and_the_last_round_is_evaluated():
    scripts = {"a": Scripted("a", [0.1, 0.0, 0.0], 5), "b": Scripted("b", [0.0, 0.1, 0.0], 5)}
    notes: list[str] = []
    privacy = dp_plan(2, target_epsilon=8.0, noise_multiplier=2.0, delta_noise_multiplier=2.0)
    e = private(scripts, privacy, rounds=50, eval_every=100)
    e.notify = notes.append
    results = list(e.run())
    last = results[-1]
    assert 1 < last.round_num < 50 and last.eval is not None
    assert last.privacy.epsilon <= 8.0
    assert notes == [
        f"stopped before round {last.round_num + 1}: it could spend more than privacy.target_epsilon = 8.0"
    ]
    assert all(r.eval is None for r in results[1:-1])


def test_a_rule_over_each_update_is_refused_where_only_sums_exist():
    scripts = {"a": Scripted("a", [1.0, 0.0, 0.0], 5), "b": Scripted("b", [0.0, 1.0, 0.0], 5)}
    secure = SecureSettings(bits=16, clip_range=1.0, neighbours="all", threshold=None, max_weight=5)
    median = make_aggregator(ServerConfig(rule="median"))
    with pytest.raises(ConfigError, match="reveals only their sum"):
        RoundEngine(
            plan(("a", "b"), secure=secure),
            InProcessTransport(lambda m: scripts[m.client_id]),
            median,
            torch.zeros(NUMEL),
        )
    e = RoundEngine(
        plan(("a", "b"), rounds=1),
        InProcessTransport(lambda m: scripts[m.client_id]),
        median,
        torch.zeros(NUMEL),
    )
    list(e.run())
    assert torch.equal(e.global_flat, torch.tensor([0.5, 0.5, 0.0]))  # the median of two: their mean


def test_a_sites_state_store_repeats_a_round_from_the_state_before_it():
    store = ClientStateStore(repeatable=True)
    first = ClientState(torch.ones(2), 4)
    store.commit("a", 1, first)
    second = ClientState(torch.full((2,), 2.0), 8)
    store.commit("a", 2, second)
    assert store.begin("a", 2) is first  # round 2 handed out again after a restart: start as before it
    store.commit("a", 2, ClientState(torch.full((2,), 3.0), 8))
    assert store.begin("a", 3).residual is not None and float(store.begin("a", 3).residual[0]) == 3.0
    with pytest.raises(StateError, match="already committed round 2"):
        store.begin("a", 1)
    assert store.nbytes == 2 * 2 * 4  # the latest state and the one before it


def test_a_simulations_state_store_keeps_one_state_per_client_and_round_trips():
    store = ClientStateStore()
    store.commit("a", 1, ClientState(torch.arange(3.0), 2))
    store.commit("b", 1, ClientState(None, 5))
    with pytest.raises(StateError):
        store.begin("a", 1)  # a simulation never repeats a round
    assert store.nbytes == 12 and len(store) == 2
    tensors, meta = store.state_dict()
    again = ClientStateStore()
    again.load_state_dict(tensors, meta)
    assert torch.equal(again.get("a").residual, torch.arange(3.0)) and again.get("b").dpsgd_steps == 5
    with pytest.raises(StateError, match="for no client"):
        ClientStateStore().load_state_dict({"residual/z": torch.zeros(1)}, {})
